"""The coordinator under faults, with in-process sites: lost sites, resumed runs, robust means."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message

from client.client_app import app as client_app
from client.site import read_manifest
from server.checkpoint import Checkpoint, fingerprint
from server.federation import run_federation
from server.progress import Progress
from shared import protocol
from shared.schema import load_schema
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, manifest_contexts


def _grid(tmp_path: Path, n_sites: int = 4) -> InProcessGrid:
    manifest = read_manifest(generate(tmp_path / "data", n_sites=n_sites, seed=11))
    return InProcessGrid(manifest_contexts(manifest, tmp_path, {}), client_app)


def _settings(**overrides: Any) -> RunSettings:
    values: dict[str, Any] = {"num_server_rounds": 5, "min_sites": 2, "node_wait_timeout": 1.0,
                              "reply_timeout": 5.0}
    return RunSettings(**{**values, **overrides})


def _run(grid: InProcessGrid, out: Path, settings: RunSettings,
         checkpoint: Checkpoint | None = None) -> dict[str, Any]:
    return run_federation(grid, settings, Progress(out), {}, checkpoint=checkpoint)


def _silent_from_round(grid: InProcessGrid, node: int, rnd: int) -> None:
    """Make ``node`` stop answering from training round ``rnd`` on (a killed site)."""

    def handler(msg: Message, ctx: Context) -> Message:
        config = msg.content.config_records.get(protocol.CONFIG)
        if msg.metadata.message_type == protocol.TRAIN and config is not None and (
            int(str(config["server-round"])) >= rnd
        ):
            grid.offline.add(node)  # Flower lists it as gone only later; it answers nothing
            return None  # type: ignore[return-value]
        return client_app(msg, ctx)

    grid.handlers[node] = handler


def test_a_site_lost_mid_training_is_reported_and_the_others_finish(tmp_path: Path) -> None:
    """Every round completes with the survivors; the lost site and its missed rounds are named."""
    grid = _grid(tmp_path)
    _silent_from_round(grid, 102, 2)
    report = _run(grid, tmp_path / "out", _settings())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4, 5]
    assert report["rounds"][1]["dropped"] == ["hospital-b"]
    lost = report["sites"]["hospital-b"]
    assert lost["status"] == "lost"
    assert lost["lost"][0]["rounds_missed"] == [2, 3, 4, 5]
    assert {n for n, s in report["sites"].items() if s["status"] == "ok"} == {
        "hospital-a", "hospital-c", "hospital-d"}


def test_an_interrupted_run_resumes_from_its_last_round(tmp_path: Path) -> None:
    """Killed after round 3, restarted: rounds 4-5 run once, results equal an unbroken run."""
    settings = _settings()
    key = fingerprint(settings, load_schema(settings.schema).digest())
    unbroken = _run(_grid(tmp_path / "a"), tmp_path / "a" / "out", settings)

    grid = _grid(tmp_path / "b")
    out = tmp_path / "b" / "out"
    checkpoint = Checkpoint(out, key)
    calls = {"train": 0}
    push = grid.push_messages

    def crash_in_round_4(messages: Any) -> list[str]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type == protocol.TRAIN:
            calls["train"] += 1
            if calls["train"] == 4:
                raise KeyboardInterrupt("coordinator killed")
        return push(messages)

    grid.push_messages = crash_in_round_4  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        _run(grid, out, settings, checkpoint)
    saved = checkpoint.load()
    assert saved is not None and saved["round"] == 3

    grid.push_messages = push  # type: ignore[method-assign]
    resumed = _run(grid, out, settings, Checkpoint(out, key))
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4, 5]
    for name, site in unbroken["sites"].items():
        for method in ("local", "source", "adapted"):
            assert math.isclose(resumed["sites"][name]["metrics"][method]["auc"],
                                site["metrics"][method]["auc"], abs_tol=1e-9), (name, method)


def test_a_checkpoint_of_other_settings_is_not_resumed(tmp_path: Path) -> None:
    """Another fingerprint (other seed): the saved state is ignored."""
    settings = _settings()
    Checkpoint(tmp_path, fingerprint(settings, "x")).save({"completed": [], "round": 2})
    other = Checkpoint(tmp_path, fingerprint(_settings(seed=7), "x"))
    assert other.load() is None


def _scaled_site(factor: float) -> Any:
    def handler(msg: Message, ctx: Context) -> Message:
        reply = client_app(msg, ctx)
        if msg.metadata.message_type == protocol.TRAIN and not reply.has_error():
            arrays = reply.content.array_records[protocol.ARRAYS]
            reply.content[protocol.ARRAYS] = ArrayRecord(
                {k: Array(arrays[k].numpy() * factor) for k in arrays})
        return reply
    return handler


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg"])
def test_robust_aggregation_limits_one_wildly_wrong_site(tmp_path: Path, strategy: str) -> None:
    """One site sends its weights times -20: FedAvg's AUC collapses, a robust mean's does not."""
    results = {}
    for name in ("fedavg", strategy):
        grid = _grid(tmp_path / name)
        grid.handlers[104] = _scaled_site(-20.0)
        report = _run(grid, tmp_path / name / "out", _settings(strategy=name))
        honest = ["hospital-a", "hospital-b", "hospital-c"]
        results[name] = np.mean([report["sites"][n]["metrics"]["source"]["auc"] for n in honest])
    assert results["fedavg"] < 0.5 < 0.6 < results[strategy]
