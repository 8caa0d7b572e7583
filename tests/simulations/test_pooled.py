"""The pooled reference: central model on every usable site's training rows."""

from __future__ import annotations

from pathlib import Path

from client.site import read_manifest
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.pooled import pooled_reference


def test_failed_and_unreadable_sites_are_left_out_and_named(tmp_path: Path) -> None:
    """A site missing its file or failed in the run is skipped, not a crash; the rest count."""
    manifest = read_manifest(generate(tmp_path, n_sites=4, seed=7))
    (tmp_path / "hospital-c.csv").unlink()
    settings = RunSettings(schema="synthetic")
    ok = ["hospital-a", "hospital-c", "hospital-d"]  # hospital-b failed in the run
    pooled, skipped = pooled_reference(manifest, settings, ok)
    assert sorted(skipped) == ["hospital-b", "hospital-c"]
    assert sorted(pooled) == ["hospital-a", "hospital-d"]
    assert all(len(v) == 1 and v[0]["pooled.auc"] > 0.5 for v in pooled.values())


def test_a_protocol_that_leaves_a_site_no_rows_skips_it(tmp_path: Path) -> None:
    """FLamby's row rule on generated data empties hospital-d (no blood pressure): skipped."""
    manifest = read_manifest(generate(tmp_path, n_sites=4, seed=7))
    pooled, skipped = pooled_reference(manifest, RunSettings(protocol="flamby"))
    assert skipped == ["hospital-d"]
    assert "hospital-a" in pooled
