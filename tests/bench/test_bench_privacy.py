"""The utility-against-privacy table: paired differences per split, and a readable layout."""

from __future__ import annotations

from typing import Any

import pytest

from bench.privacy import _paired, markdown, table_rows


def _runs(source: list[float], eps: float | None = None) -> list[dict[str, Any]]:
    return [{"north": {"adapted": s + 0.01, "source": s, "epsilon": eps, "stopped": False,
                       "status": "ok", "n_train": 140, "n_test": 60}} for s in source]


def test_paired_difference_is_split_by_split_with_a_corrected_interval() -> None:
    """A constant cost of 0.02 per split is reported as -0.02 with a zero-width interval."""
    base = _runs([0.80, 0.70, 0.90])
    dp = _runs([0.78, 0.68, 0.88], eps=3.0)
    out = _paired(base, dp, "north", "source")
    assert out["difference"] == pytest.approx(-0.02)
    assert out["low"] == pytest.approx(-0.02) and out["high"] == pytest.approx(-0.02)
    assert out["method"] == "corrected t" and out["splits"] == 3
    noisy = _paired(base, _runs([0.75, 0.72, 0.86], eps=3.0), "north", "source")
    assert noisy["low"] < noisy["difference"] < noisy["high"]


def test_table_fits_100_columns_and_names_every_level() -> None:
    """Header, AUC rows, paired rows and the epsilon row; markdown carries the same rows."""
    entry = {"adapted": {"mean": 0.9, "sd": 0.02, "n": 3}, "source": {"mean": 0.88, "sd": 0.03,
                                                                      "n": 3},
             "epsilon_mean": None, "epsilon_max": None, "stopped_runs": 0}
    dp_entry = {**entry, "epsilon_mean": 2.99, "epsilon_max": 2.99, "stopped_runs": 1,
                "vs_no_dp": {"source": {"difference": -0.02, "low": -0.05, "high": 0.01},
                             "adapted": {"difference": 0.0, "low": None, "high": None}}}
    result = {"data": "heart:x", "splits": 3, "delta": 1e-5, "clip": 1.0, "rounds": 30,
              "strategy": "fedavg", "levels": {"none": {"sites": {"north": entry}},
                                               "3": {"sites": {"north": dp_entry}}}}
    header, rows = table_rows(result)
    assert header == ["site", "figure", "no DP", "eps 3"]
    cells = {r[1]: r[2:] for r in rows}
    assert cells["source - no DP"] == ["-", "-0.020 ±0.030"]
    assert cells["adapted - no DP"] == ["-", "+0.000"]
    assert cells["epsilon spent"] == ["-", "2.99, stopped 1x"]
    assert max(len(" | ".join(r)) for r in rows) < 100
    assert "| north | source - no DP | - | -0.020 ±0.030 |" in markdown(result)
