"""The coordinator's phases over in-process sites: report contract, failing sites, bounded waits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from client.client_app import app as client_app
from client.site import read_manifest
from server.federation import RunFailed, run_federation
from server.progress import Progress
from server.sites import NotEnoughSites
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, manifest_contexts

METRIC_KEYS = {"auc", "accuracy", "brier", "auc_sd"}


def _grid(tmp_path: Path, n_sites: int = 4) -> InProcessGrid:
    manifest = read_manifest(generate(tmp_path / "data", n_sites=n_sites, seed=3))
    return InProcessGrid(manifest_contexts(manifest, tmp_path, {}), client_app)


def _run(grid: InProcessGrid, tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"num_server_rounds": 3, "min_sites": 2, "node_wait_timeout": 1.0}
    settings = RunSettings(**{**values, **overrides})
    return run_federation(grid, settings, Progress(tmp_path / "out"), {"test": True})


def test_report_follows_the_contract(tmp_path: Path) -> None:
    """Every documented key is present, for every site and method, with sane values."""
    report = _run(_grid(tmp_path), tmp_path, repeats=2)
    assert set(report) >= {"config", "sites", "rounds", "timing_s", "summary"}
    assert set(report["timing_s"]) == {"total", "stats", "train", "groups", "adapt", "evaluate"}
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in report["rounds"])
    assert set(report["sites"]) == {"hospital-a", "hospital-b", "hospital-c", "hospital-d"}
    for name, site in report["sites"].items():
        assert site["status"] == "ok", name
        assert {"n_train", "n_test", "positives_test", "site_features", "metrics",
                "correction"} <= set(site)
        assert site["n_train"] > site["n_test"] > 0
        assert set(site["metrics"]) == {"local", "source", "adapted"}
        for method in site["metrics"].values():
            assert set(method) >= METRIC_KEYS
            assert 0.0 <= method["accuracy"] <= 1.0
            assert method["auc_sd"] is not None  # two repeats
        assert {"applied", "strength"} <= set(site["correction"])
    assert report["sites"]["hospital-a"]["site_features"] == ["glucose"]
    assert report["sites"]["hospital-b"]["site_features"] == []


def test_a_site_with_a_broken_file_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    """A malformed file fails its own site, named with file and line; the run completes."""
    grid = _grid(tmp_path)
    bad = Path(str(grid.contexts[102].node_config["data-file"]))
    lines = bad.read_text().splitlines()
    lines[7] = lines[7] + ",extra"
    bad.write_text("\n".join(lines) + "\n")
    report = _run(grid, tmp_path)
    failed = [n for n, s in report["sites"].items() if s["status"] == "failed"]
    assert failed == ["hospital-b"]  # named by the site itself in its error reply
    assert "<data-file>:8:" in report["sites"]["hospital-b"]["error"]
    assert str(bad) not in report["sites"]["hospital-b"]["error"]
    assert sum(s["status"] == "ok" for s in report["sites"].values()) == 3


def test_no_usable_site_stops_the_run_with_the_reasons(tmp_path: Path) -> None:
    """When every site fails the stats phase, the run stops and says why."""
    grid = _grid(tmp_path, n_sites=2)
    for context in grid.contexts.values():
        Path(str(context.node_config["data-file"])).write_text("")
    with pytest.raises(RunFailed, match="the file is empty"):
        _run(grid, tmp_path)


def test_too_few_sites_stop_waiting_after_the_timeout(tmp_path: Path) -> None:
    """Fewer sites than min-sites: a clear error after node-wait-timeout, never a hang."""
    grid = _grid(tmp_path, n_sites=2)
    t0 = time.monotonic()
    with pytest.raises(NotEnoughSites, match="only 2 site"):
        _run(grid, tmp_path, min_sites=5)
    assert time.monotonic() - t0 < 30  # bounded (the timeout is 1 s; generous for CI noise)
