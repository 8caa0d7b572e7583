"""The coordinator under faults, with in-process sites: lost sites, resumed runs, robust means."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Error, Message

from client.client_app import app as client_app
from client.site import read_manifest
from server.checkpoint import Checkpoint, fingerprint
from server.federation import RunFailed, run_federation
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
        # The two large honest sites (hospital-c's held-out set has 3 positives: no judge).
        honest = ["hospital-a", "hospital-b"]
        results[name] = np.mean([report["sites"][n]["metrics"]["source"]["auc"] for n in honest])
    assert results["fedavg"] < 0.5 < 0.6 < results[strategy]


def _unavailable_from_round(grid: InProcessGrid, node: int, rnd: int,
                            back_after: int | None = None) -> None:
    """From round ``rnd``, Flower's SuperLink answers for ``node``: "node unavailable".

    Such an error reply names the SuperLink (node id 1) as its source, not the site. With
    ``back_after``, the site answers again from the round after that one (and in later phases).
    """

    def handler(msg: Message, ctx: Context) -> Message:
        config = msg.content.config_records.get(protocol.CONFIG)
        rnd_now = int(str(config["server-round"])) if (
            config is not None and "server-round" in config) else None
        gone = msg.metadata.message_type == protocol.TRAIN and rnd_now is not None and (
            rnd_now >= rnd and (back_after is None or rnd_now <= back_after))
        if not gone and (back_after is not None or msg.metadata.message_type != protocol.TRAIN
                         or rnd_now is None or rnd_now < rnd):
            return client_app(msg, ctx)
        reply = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = 1  # as the SuperLink's own error replies
        return reply

    grid.handlers[node] = handler


def test_a_superlink_error_reply_is_the_site_s_not_a_phantom_node(tmp_path: Path) -> None:
    """"Node unavailable" (sent by the SuperLink) counts against the site it was sent to."""
    grid = _grid(tmp_path)
    _unavailable_from_round(grid, 102, 2)
    report = _run(grid, tmp_path / "out", _settings())
    assert sorted(report["sites"]) == ["hospital-a", "hospital-b", "hospital-c", "hospital-d"]
    assert not any(name.startswith("node-") for name in report["sites"])
    assert report["sites"]["hospital-b"]["lost"][0]["round"] == 2
    assert report["rounds"][1]["dropped"] == ["hospital-b"]
    assert report["sites"]["hospital-b"]["node_id"] == 102


def test_a_site_that_is_back_answers_adapt_and_evaluate(tmp_path: Path) -> None:
    """Lost in rounds 2-3, back from round 4: it sits out training but gets its correction."""
    grid = _grid(tmp_path)
    _unavailable_from_round(grid, 102, 2, back_after=3)
    report = _run(grid, tmp_path / "out", _settings())
    site = report["sites"]["hospital-b"]
    assert site["status"] == "ok", site
    assert site["lost"][0]["rounds_missed"] == [2, 3, 4, 5]
    assert site["metrics"]["adapted"]["auc"] is not None
    assert len(report["sites"]) == 4


def test_two_sites_with_one_name_stop_the_run_naming_both_nodes(tmp_path: Path) -> None:
    """A duplicated site-name is refused at the coordinator, with both node ids."""
    grid = _grid(tmp_path)
    grid.contexts[103].node_config["site-name"] = "hospital-b"
    with pytest.raises(RunFailed, match=r"two sites call themselves 'hospital-b' \(nodes 102 "
                                         r"and 103\)"):
        _run(grid, tmp_path / "out", _settings())


def test_a_run_naming_the_wrong_schema_fails_once_as_the_coordinator_s_mistake(
    tmp_path: Path,
) -> None:
    """Every site's file misfits the run's schema: one coordinator error, not N data errors."""
    grid = _grid(tmp_path)
    with pytest.raises(RunFailed) as failed:
        _run(grid, tmp_path / "out", _settings(schema="heart"))
    message = str(failed.value)
    assert message.startswith("no site's data fit schema 'heart', which this run names")
    assert "correct these cells" not in message.split("First site's answer")[0]


def test_a_checkpoint_of_other_settings_is_reported_not_silently_dropped(
    tmp_path: Path,
) -> None:
    """The run starts afresh, and its progress says why the checkpoint was not resumed."""
    import json

    out = tmp_path / "out"
    Checkpoint(out, "another-run").save({"completed": [], "repeat": 0, "round": 3})
    settings = _settings(num_server_rounds=2)
    key = fingerprint(settings, load_schema(settings.schema).digest())
    _run(_grid(tmp_path), out, settings, Checkpoint(out, key))
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    (note,) = [e for e in events if e["event"] == "checkpoint-ignored"]
    assert note["reason"] == "of a run with other settings"
