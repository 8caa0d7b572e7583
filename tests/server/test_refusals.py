"""Sites that refuse training by their policy: no waiting for them, the run still reports."""

from __future__ import annotations

import time
from pathlib import Path

from client.client_app import app as client_app
from client.site import read_manifest
from server.federation import run_federation
from server.progress import Progress
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, manifest_contexts


def test_too_few_sites_accepting_training_ends_it_early_and_the_run_reports(
    tmp_path: Path,
) -> None:
    """Two of three sites refuse training: it ends after round 1, nobody waits, all evaluated."""
    manifest = read_manifest(generate(tmp_path / "data", n_sites=3, seed=4))
    settings = RunSettings(sites_manifest=str(manifest.path), schema=manifest.schema,
                           expected_sites=3, out=str(tmp_path / "out"), num_server_rounds=4,
                           node_wait_timeout=60.0, strategy="fedavg")
    contexts = manifest_contexts(manifest, tmp_path / "out", settings.to_run_config())
    no_training = tmp_path / "no-training.toml"
    no_training.write_text('phases = ["stats", "adapt", "evaluate"]\n', encoding="utf-8")
    refusing = sorted(contexts)[:2]
    for node in refusing:
        contexts[node].node_config["policy"] = str(no_training)
    t0 = time.monotonic()
    report = run_federation(InProcessGrid(contexts, client_app), settings,
                            Progress(tmp_path / "out"), {})
    assert time.monotonic() - t0 < 60  # the refused sites were not waited for
    assert len(report["notes"]) == 1 and "training ended early" in report["notes"][0]
    assert "refused training by their policies" in report["notes"][0]
    sites = report["sites"]
    names = [contexts[n].node_config["site-name"] for n in refusing]
    for name, site in sites.items():
        assert site["status"] == "ok" and site["metrics"], name
        assert bool(site.get("refused")) == (name in names)
    assert [r["round"] for r in report["rounds"]] == [1]
