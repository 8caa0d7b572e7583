"""Tests for server.report: JSON, Markdown, PNG plots and the terminal table."""

from __future__ import annotations

import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from server.report import (
    METHODS,
    plot_loss,
    plot_metrics,
    render_markdown,
    site_table,
    to_jsonable,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SITE_NAMES = ("north_general", "st_mary", "lakeside_clinic", "hill_county", "east_regional")


def _metrics(rng: np.random.Generator, base: float, sd: bool, auc: bool = True) -> dict[str, Any]:
    """Build one method's metrics at a site."""
    return {
        "auc": round(base + rng.uniform(0, 0.05), 4) if auc else None,
        "accuracy": round(base - 0.05 + rng.uniform(0, 0.05), 4),
        "brier": round(0.25 - base / 5 + rng.uniform(0, 0.02), 4),
        "log_loss": round(0.7 - base / 3, 4),
        "auc_sd": round(rng.uniform(0.01, 0.04), 4) if sd and auc else None,
        "accuracy_sd": round(rng.uniform(0.01, 0.04), 4) if sd else None,
        "brier_sd": round(rng.uniform(0.002, 0.01), 4) if sd else None,
        "log_loss_sd": round(rng.uniform(0.01, 0.03), 4) if sd else None,
        "auc_n": 3 if auc else 0,
    }


def _site(
    rng: np.random.Generator, n_test: int, prevalence: float, auc: bool = True, pooled: bool = True
) -> dict[str, Any]:
    """Build a successful site entry with every method."""
    methods = {"local": 0.70, "source": 0.76, "adapted": 0.80, "pooled": 0.82}
    if not pooled:
        methods.pop("pooled")
    return {
        "n_train": n_test * 2,
        "n_test": n_test,
        "positives_test": round(n_test * prevalence),
        "prevalence_test": prevalence,
        "site_features": ["lab_b"] if auc else [],
        "status": "ok",
        "error": None,
        "metrics": {m: _metrics(rng, base, sd=True, auc=auc) for m, base in methods.items()},
        "correction": {
            "applied": auc,
            "strength": 0.42 if auc else None,
            "applied_fraction": 2 / 3 if auc else 0.0,
        },
    }


def _report(n_sites: int = 5, pooled: bool = True) -> dict[str, Any]:
    """Build a realistic report: one site with AUC null, one failed site, sd values, pooled."""
    rng = np.random.default_rng(0)
    names = list(SITE_NAMES) if n_sites == 5 else [f"site_{i:04d}" for i in range(n_sites)]
    sites: dict[str, Any] = {}
    for i, name in enumerate(names):
        sites[name] = _site(rng, 60 + 17 * (i % 9), 0.1 + 0.05 * (i % 7), pooled=pooled)
    sites[names[2]] = _site(rng, 25, 0.04, auc=False, pooled=pooled)
    sites[names[1]]["metrics"]["local"]["auc_n"] = 2  # AUC undefined in one of three repeats
    sites[names[-1]] = {
        "n_train": 0,
        "n_test": 0,
        "positives_test": 0,
        "prevalence_test": 0.0,
        "site_features": [],
        "status": "failed",
        "error": "schema mismatch: required column 'age' missing",
        "metrics": {},
        "correction": {"applied": False, "strength": None, "applied_fraction": 0.0},
    }
    methods = [m for m in METHODS if pooled or m != "pooled"]
    return {
        "config": {
            "fedadapt_version": "0.1.0",
            "flwr_version": "1.41.0",
            "data": "simulations/demo/sites.toml",
            "schema": "synthetic",
            "protocol": "default",
            "repeats": 3,
            "seed": 42,
            "num-server-rounds": 12,
            "strategy": "fedavg",
            "model": "logreg",
            "learning-rate": 0.5,
            "hidden-units": [16, 8],
        },
        "sites": sites,
        "rounds": [
            {"round": r, "loss": 0.69 * math.exp(-r / 5) + 0.3, "loss_sd": 0.02 + 0.01 / r}
            for r in range(1, 13)
        ],
        "summary": {
            "methods": {
                m: {"mean_auc": 0.8, "mean_accuracy": 0.78, "mean_brier": 0.16, "log_loss": 0.45}
                for m in methods
            },
            "majority_accuracy": 0.74,
        },
        "timing_s": {"total": 12.5, "stats": 0.4, "train": 9.1, "adapt": 1.2, "evaluate": 1.8},
    }


def _strict_loads(text: str) -> Any:
    """Parse JSON, failing on NaN and infinities."""

    def reject(name: str) -> Any:
        raise ValueError(f"non-finite constant {name} in JSON")

    return json.loads(text, parse_constant=reject)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write the small report once for the file checks."""
    report = _report()
    return report, write_report(report, tmp_path_factory.mktemp("out"))


def test_json_round_trips_without_nan(written: tuple[dict[str, Any], dict[str, Path]]) -> None:
    """report.json parses strictly and equals the input report."""
    report, paths = written
    assert paths["json"].name == "report.json"
    assert _strict_loads(paths["json"].read_text(encoding="utf-8")) == report
    assert not list(paths["json"].parent.glob(".*.tmp"))


def test_nan_and_numpy_become_plain_json(tmp_path: Path) -> None:
    """NaN and infinities become null; numpy scalars and arrays become numbers and lists."""
    report = _report()
    site = report["sites"]["north_general"]["metrics"]["source"]
    site["auc"] = float("nan")
    site["brier_sd"] = np.float64("inf")
    site["accuracy"] = np.float32(0.75)
    site["auc_n"] = np.int64(2)
    report["rounds"][0]["loss"] = float("nan")
    report["config"]["weights"] = np.array([0.5, np.nan])
    paths = write_report(report, tmp_path)
    loaded = _strict_loads(paths["json"].read_text(encoding="utf-8"))
    got = loaded["sites"]["north_general"]["metrics"]["source"]
    assert got["auc"] is None and got["brier_sd"] is None
    assert got["accuracy"] == pytest.approx(0.75) and got["auc_n"] == 2
    assert loaded["rounds"][0]["loss"] is None
    assert loaded["config"]["weights"] == [0.5, None]
    assert math.isnan(report["sites"]["north_general"]["metrics"]["source"]["auc"])  # untouched
    assert to_jsonable({1: (np.bool_(True), -math.inf)}) == {"1": [True, None]}


def test_markdown_content(written: tuple[dict[str, Any], dict[str, Path]]) -> None:
    """report.md names every site, shows sd and null AUC, and links both plots."""
    _, paths = written
    text = paths["markdown"].read_text(encoding="utf-8")
    for name in SITE_NAMES:
        assert name in text
    assert "± " in text
    assert " (n=2)" in text
    assert "| lakeside_clinic | 25 | 1 (4.0%) | — | — | — | — |" in text
    assert "![Per-site metrics by method](plots/metrics.png)" in text
    assert "![Training loss by round](plots/loss.png)" in text
    assert "schema mismatch" in text and "majority label" in text
    assert "pooled" in text and "## Configuration" in text and "## Timing" in text


def test_markdown_without_pooled_or_plots() -> None:
    """Without pooled results no pooled column appears, and without plots no image link."""
    text = render_markdown(_report(pooled=False))
    assert "pooled" not in text
    assert "![" not in text


def test_pngs_written(written: tuple[dict[str, Any], dict[str, Path]]) -> None:
    """Both plots exist, are PNG files, and have a plausible size."""
    _, paths = written
    for name in ("metrics", "loss"):
        data = paths[name].read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 5_000, name


def test_loss_plot_without_rounds(tmp_path: Path) -> None:
    """An empty rounds list still gives a readable PNG."""
    report = _report()
    report["rounds"] = []
    path = plot_loss(report, tmp_path / "loss.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_single_site_one_repeat(tmp_path: Path) -> None:
    """One site and one repeat (sd null) render every output without any ± sign."""
    report = _report()
    report["config"]["repeats"] = 1
    site = copy.deepcopy(report["sites"]["north_general"])
    for metrics in site["metrics"].values():
        metrics.update({key: None for key in metrics if key.endswith("_sd")})
    report["sites"] = {"only": site}
    paths = write_report(report, tmp_path)
    text = paths["markdown"].read_text(encoding="utf-8")
    assert "only" in text and "±" not in text
    assert plot_metrics(report, tmp_path / "again.png").stat().st_size > 5_000


def test_site_table_rows(written: tuple[dict[str, Any], dict[str, Path]]) -> None:
    """One row per site plus the two means; at its natural width it fits 100 columns."""
    report, _ = written
    table = site_table(report)
    assert table.row_count == len(report["sites"]) + 2
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    for name in SITE_NAMES:
        assert name[:11] in text
    assert "failed" in text
    assert max(len(line.rstrip()) for line in text.splitlines()) <= 100


def test_thousand_sites(tmp_path: Path) -> None:
    """A 1000-site report renders every output, and the Markdown lists only 50 sites."""
    report = _report(n_sites=1000)
    paths = write_report(report, tmp_path)
    text = paths["markdown"].read_text(encoding="utf-8")
    assert "site_0049" in text and "site_0050" not in text
    assert "of 1000 sites" in text
    assert paths["metrics"].read_bytes().startswith(PNG_SIGNATURE)
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(site_table(report))
    assert "site_0999" in console.export_text()


def test_markdown_shows_each_feature_group() -> None:
    """A group's members, rows, rounds, effects and the sites that chose it; none: no section."""
    report = _report(pooled=False)
    assert "Feature groups" not in render_markdown(report)
    report["groups"] = {"glucose": {
        "features": ["glucose"], "members": ["site-a", "site-b"], "trained": 3, "skipped": [],
        "rows": 903.0, "rounds": 6.0, "effects": {"glucose": 1.51, "glucose:missing": 0.84},
        "chosen_by": {"site-a": 3}}}
    text = render_markdown(report)
    row = next(line for line in text.splitlines() if line.startswith("| glucose |"))
    assert "site-a, site-b" in row and "| 903 |" in row and "| 6.0 |" in row
    assert "glucose +1.510" in row and "site-a (3)" in row


def test_the_reports_files_are_private_to_their_owner(
        written: tuple[dict[str, Any], dict[str, Path]]) -> None:
    """report.json, report.md and the plots: 0600, as the rest of a run's folder."""
    import stat

    _, paths = written
    for path in paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_a_runs_event_log_is_private(tmp_path: Path) -> None:
    """events.jsonl is created 0600 whatever the umask (replies.jsonl: the same helper)."""
    import os
    import stat

    from server.progress import Progress

    old = os.umask(0o022)
    try:
        progress = Progress(tmp_path)
        progress.emit("phase", phase="stats")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "events.jsonl").stat().st_mode) == 0o600


def test_the_table_says_how_the_used_model_fares_and_drops_a_pooled_column_equal_to_source(
) -> None:
    """'vs other': the used model against the better other; pooled = source: no column."""
    from rich.console import Console

    from server.report.table import site_table

    report = _report()
    for site in report["sites"].values():
        metrics = site.get("metrics") or {}
        if "source" in metrics:
            metrics["pooled"] = dict(metrics["source"])
            metrics["oracle"] = dict(metrics["source"])  # generated data: the true model
    console = Console(width=100, record=True)
    console.print(site_table(report))
    text = console.export_text()
    header = next(line for line in text.splitlines() if "n/pos." in line)
    assert "source" in header and "pooled" not in header
    assert "equals the source model's at every site" in " ".join(text.split())
    assert "vs other" in text and max(len(line) for line in text.splitlines()) <= 100
    assert "true" in header and "not a ceiling" in " ".join(text.split())


def test_an_early_convergence_is_said_and_the_summary_counts_agree() -> None:
    """Converged in round 5 of 30: said once; 'N of M sites' and the judged count in one line."""
    from server.report.markdown import render_markdown

    report = _report()
    report["config"]["num-server-rounds"] = 30
    report["converged_rounds"] = [5]
    text = " ".join(render_markdown(report, {}).split())
    assert "Training converged in round 5 of the 30 planned" in text
    assert "Means are over the" in text and "Means over the sites with results" not in text


def test_the_calibration_plot_names_the_sites_it_leaves_out(tmp_path: Path) -> None:
    """A site without a reliability curve is named, not dropped in silence."""
    from server.report.plots import calibration_sites, plot_calibration

    report = _report()
    names = list(report["sites"])
    for site in report["sites"].values():
        site["reliability"] = {"source": {"predicted": [0.2, 0.6], "observed": [0.1, 0.7],
                                          "rows": [10, 10]}}
    report["sites"][names[-1]]["reliability"] = {}
    shown, left_out = calibration_sites(report)
    assert left_out == [names[-1]] and [n for n, _ in shown] == names[:-1]
    assert plot_calibration(report, tmp_path / "calibration.png").stat().st_size > 0


def test_with_one_split_the_bars_get_about_95_percent_intervals() -> None:
    """AUC: Hanley and McNeil's SE; accuracy: binomial; an sd over splits wins; Brier: none."""
    import math

    from server.report.plots import _value_spread

    site = {"n_test": 100, "positives_test": 40,
            "metrics": {"local": {"auc": 0.8, "accuracy": 0.75, "brier": 0.2},
                        "source": {"auc": 0.7, "auc_sd": 0.05}}}
    a, n1, n2 = 0.8, 40, 60
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    se = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a))
                   / (n1 * n2))
    assert _value_spread(site, "local", "auc") == pytest.approx((0.8, 1.96 * se))
    assert _value_spread(site, "local", "accuracy") == pytest.approx(
        (0.75, 1.96 * math.sqrt(0.75 * 0.25 / 100)))
    assert _value_spread(site, "local", "brier") == (0.2, None)
    assert _value_spread(site, "source", "auc") == (0.7, 0.05)
