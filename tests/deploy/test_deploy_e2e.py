"""Real SuperLink and SuperNodes over TLS with authenticated sites: slow, bounded, clean."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from client.client_app import app as client_app
from client.correction_store import CorrectionRefused, load_correction
from client.site import read_manifest
from client.source_model_store import load_source_model
from deploy.local import (
    coordinator,
    deploy_local,
    register_site,
    start_supernode,
    submit_run,
    supernode_command,
)
from server.certs import make_certs
from server.federation import run_federation
from server.progress import Progress
from shared import newton
from shared.settings import RunSettings
from simulations.datasets import sites_for_run
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, manifest_contexts

# In the default run: the TLS deployment smoke test (refusals, then one authenticated site's
# run); the comparison with an in-process run only in the full run (-m full).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The deployment and the in-process run use the same code on the same rows and split keys;
# they may differ only in the order floating-point sums are taken.
TOLERANCE = 1e-6


def _replies(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _numbers(entry: dict[str, Any]) -> list[float]:
    out: list[float] = []
    for record in entry.get("metrics", {}).values():
        for value in record.values():
            out += [v for v in (value if isinstance(value, list) else [value]) if v is not None]
    for record in entry.get("arrays", {}).values():
        for array in record.values():
            out += array["values"]
    return out


def _in_process(dep_out: Path, policy: Path, settings: RunSettings) -> dict[str, Any]:
    """The same deployed sites in one process, on copies of their folders (split keys)."""
    copies = dep_out.parent / "in-process"
    shutil.copytree(dep_out / "sites", copies / "sites")
    manifest = read_manifest(dep_out / "data" / "sites.toml")
    contexts = manifest_contexts(manifest, copies, {})
    for context in contexts.values():
        context.node_config = {**context.node_config, "policy": str(policy)}
        del context.node_config["simulated"]
    return run_federation(InProcessGrid(contexts, client_app), settings,
                          Progress(copies / "out"), {})


@pytest.mark.full
def test_tls_run_matches_an_in_process_run_and_keeps_corrections_at_sites(
    tmp_path: Path, no_leftovers: None
) -> None:
    """The same sites in one process: the same numbers; corrections never leave a site.

    The sites answer without DP here (their policy says `require-dp = false`, a site's own
    choice), so that both runs are exact and comparable.
    """
    settings = RunSettings(num_server_rounds=3, record_replies=True)
    policy = tmp_path / "open-policy.toml"
    policy.write_text("require-dp = false\n", encoding="utf-8")
    manifest = sites_for_run("synthetic", tmp_path / "dep", 3, settings)
    dep = deploy_local(manifest, tmp_path / "dep", settings, data="synthetic",
                       site_policy=policy, site_exec=False)
    sim = _in_process(tmp_path / "dep", policy, settings)
    assert dep["deployment"]["tls"] and dep["deployment"]["supernode_auth"]
    assert set(dep["sites"]) == set(sim["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    for name, site in sim["sites"].items():
        for method in ("local", "source", "adapted"):
            for metric in ("auc", "accuracy", "brier", "log_loss"):
                a = dep["sites"][name]["metrics"][method][metric]
                b = site["metrics"][method][metric]
                assert math.isclose(a, b, abs_tol=TOLERANCE), (name, method, metric, a, b)

    # Each correction file exists only in its site's own folder ...
    found = sorted(p.relative_to(tmp_path / "dep") for p in (tmp_path / "dep").rglob("*.enc"))
    assert [p.parts[:3] for p in found] == [("sites", n, "corrections") for n in sorted(
        dep["sites"])]
    corrections = {}
    for name in dep["sites"]:
        site_dir = tmp_path / "dep" / "sites" / name
        (path,) = (site_dir / "corrections").glob("*.enc")
        digest = load_source_model(site_dir).digest
        corrections[name] = load_correction(site_dir, name, digest)
        assert b"coef" not in path.read_bytes()  # sealed, not readable as text
        # ... and cannot be opened with another site's key.
        other = tmp_path / "other" / name
        other.mkdir(parents=True)
        (other / "corrections").mkdir()
        (other / "corrections" / path.name).write_bytes(path.read_bytes())
        (other / "site.key").write_bytes((tmp_path / "dep" / "sites" / "hospital-a" /
                                          "site.key").read_bytes() if name != "hospital-a" else
                                         (tmp_path / "dep" / "sites" / "hospital-b" /
                                          "site.key").read_bytes())
        (other / "site.key").chmod(0o600)
        with pytest.raises(CorrectionRefused) as refused:
            load_correction(other, name, digest)
        assert refused.value.reason == "wrong-key"

    # The replies the coordinator received (with their values): only the training round's
    # arrays (Newton, the default for the logistic model: the gradient and Hessian sums over
    # the site's training rows) and aggregates.
    assert settings.training == "newton"
    replies = _replies(tmp_path / "dep" / "replies.jsonl")
    assert {r["type"] for r in replies} == {"query.stats", "train", "query.adapt", "evaluate"}
    assert not any("error" in r for r in replies)
    for r in replies:
        for record in r["arrays"].values():
            assert r["type"] == "train"
            assert set(record) == {newton.GRAD, newton.HESS}
    weights = [c for corr in corrections.values() for c in [corr["intercept"], *corr["coef"]]
               if abs(c) > 1e-9]
    assert weights, "at least one site should have a non-trivial correction"
    numbers = [n for r in replies for n in _numbers(r)]
    for w in weights:
        assert not any(math.isclose(w, n, rel_tol=1e-12, abs_tol=0.0) for n in numbers), w


def _wait_exit(proc: Any, seconds: float) -> int | None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return int(proc.returncode)
        time.sleep(0.5)
    return None


def test_unauthorised_supernodes_are_refused_and_never_aggregated(
    tmp_path: Path, no_leftovers: None
) -> None:
    """No TLS, a foreign CA, an unregistered key: refused; only the registered site takes part."""
    manifest = generate(tmp_path / "data", n_sites=2, seed=7)
    data = {n: manifest.parent / f"{n}.csv" for n in ("hospital-a", "hospital-b")}
    foreign = make_certs(tmp_path / "foreign", 1)
    bounded = ["--max-retries", "2", "--max-wait-time", "20"]
    with coordinator(tmp_path / "run", ["hospital-a", "hospital-b"]) as dep:
        register_site(dep, "hospital-a")  # hospital-b's key is never registered
        site = tmp_path / "run" / "sites"
        bad = {
            # Plain HTTP to the TLS port (without a key: Flower itself refuses to send one
            # over an unencrypted channel).
            "no-tls": supernode_command(dep, "hospital-a", data_file=data["hospital-a"],
                                        site_dir=site / "no-tls", site_features=[],
                                        insecure=True, auth=False, extra=bounded),
            "foreign-ca": supernode_command(dep, "hospital-a", data_file=data["hospital-a"],
                                            site_dir=site / "foreign-ca", site_features=[],
                                            ca=foreign.ca_cert, extra=bounded),
            "unregistered": supernode_command(dep, "hospital-b", data_file=data["hospital-b"],
                                              site_dir=site / "unregistered", site_features=[],
                                              extra=bounded),
        }
        for name, cmd in bad.items():
            start_supernode(dep, name, cmd, site / name)
        for name in bad:
            code = _wait_exit(dep.processes[name], 120)
            assert code not in (None, 0), f"{name} was not refused (exit code {code})"
        logs = {name: dep.logs[name].read_text() for name in bad}
        assert "Server disconnected without sending a response" in logs["no-tls"]
        assert "CERTIFICATE_VERIFY_FAILED" in logs["foreign-ca"]
        assert "[code: 2004] Failed to activate SuperNode" in logs["unregistered"]
        start_supernode(dep, "hospital-a", supernode_command(
            dep, "hospital-a", data_file=data["hospital-a"], site_dir=site / "hospital-a",
            site_features=["glucose"]), site / "hospital-a")
        settings = RunSettings(num_server_rounds=2, min_sites=1, record_replies=True,
                               node_wait_timeout=120.0, dp="record")
        report = submit_run(dep.env, "fedadapt-local", settings.to_run_config(),
                            tmp_path / "run", timeout=600)
    assert list(report["sites"]) == ["hospital-a"]
    replies = _replies(tmp_path / "run" / "replies.jsonl")
    assert len({r["node"] for r in replies}) == 1  # one node only ever answered
    assert report["rounds"] and all(r["rejected"] == [] for r in report["rounds"])
