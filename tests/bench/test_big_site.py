"""The site part of the benchmark: its generated site, its measurements (no timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from bench.big_site import make_site, measure, predict_throughput

REPO = Path(__file__).resolve().parents[2]


def test_generated_site_is_a_plausible_hospital() -> None:
    """30 shared and 10 own features, some missing; the source model informative, not perfect."""
    site = make_site(6000, 40, seed=0)
    x, own, offset = site.inputs()
    assert len(site.schema.shared_features) == 30 and len(site.site_features) == 10
    assert x.shape[0] == own.shape[0] == len(offset) == len(site.label) == 6000
    assert x.shape[1] == 30 + len(site.shared_prep.indicator_features_)
    assert 0.05 < own.isna().to_numpy().mean() < 0.12
    assert 0.1 < site.label.mean() < 0.4
    assert 0.6 < roc_auc_score(site.label, offset) < 0.85
    # The wrong base rate: the source model over-predicts at this site.
    assert (1.0 / (1.0 + np.exp(-offset))).mean() > site.label.mean()
    again = make_site(6000, 40, seed=0)
    assert again.rows.equals(site.rows) and np.array_equal(again.label, site.label)
    # Another size of the same seed: the same world (source model, federation), other rows.
    larger = make_site(7000, 40, seed=0)
    np.testing.assert_array_equal(larger.source_weight, site.source_weight)
    assert larger.shared_prep.to_dict() == site.shared_prep.to_dict()
    new = make_site(6000, 40, seed=0, draw=1)
    assert not new.rows.equals(site.rows)
    np.testing.assert_array_equal(new.source_weight, site.source_weight)


def test_measure_stops_a_run_over_its_time_limit() -> None:
    """A measurement past its limit is stopped (its own process, by id) and says so."""
    result = measure("fit", 300_000, time_limit=1.0)
    assert result["status"].startswith("stopped: over 1 s")
    assert "seconds" not in result


def test_the_site_part_measures_fit_and_predict(tmp_path: Path) -> None:
    """`fedadapt bench --parts site` prints the table and writes the measurements."""
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "fedadapt", "bench", "--parts", "site", "--out", str(out),
         "--fit-rows", "1500", "--site-measures", "fit,predict"],
        cwd=REPO, capture_output=True, text=True, timeout=500,
    )
    assert done.returncode == 0, done.stderr
    assert "correction fit, 1,500 rows" in done.stdout and "wrote" in done.stdout
    results = json.loads((out / "bench.json").read_text())
    fit, predict = results["correction_fit"]["1500"], results["predict"]["1500"]
    assert fit["status"] == predict["status"] == "ok"
    assert fit["seconds"] > 0 and fit["peak_gib"] >= 0 and fit["choice"]
    assert predict["rows_per_s"] > 0 and predict["corrected_rows"] == 1500
    assert results["predict_rows_per_s"] == predict["rows_per_s"]
    assert predict_throughput(200) > 0
