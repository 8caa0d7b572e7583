"""Secure sums over a grid of real ClientApps: the totals, and what one site's replies show."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.client_app import app as site_app
from drills.curious import base_config
from server.secure_rounds import SecureChannel
from server.sites import SiteGrid, query_sites
from shared import newton, protocol, summed
from shared.preprocessing import TabularPreprocessor, merge_summaries, summary_keys
from shared.schema import load_schema
from shared.source_model import build_model, to_arrays
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, simulation_contexts

CANARY = 101


class Recording(InProcessGrid):
    """The in-process grid, keeping every reply the coordinator pulls."""

    pulled: list[Message]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Pull, and keep a copy of what came back."""
        replies = super().pull_messages(message_ids)
        self.pulled = [*getattr(self, "pulled", []), *replies]
        return replies


def _grid(tmp_path: Path, handlers: dict[int, Any] | None = None) -> Recording:
    """Four generated hospitals answering with fedadapt's ClientApp (or ``handlers``)."""
    manifest = generate(tmp_path / "data", n_sites=4, seed=11)
    config = {"sites-manifest": str(manifest), "out": str(tmp_path / "out")}
    return Recording(simulation_contexts(4, config, run_id=7), site_app, run_id=7,
                     handlers=handlers)


def _base() -> dict[str, Any]:
    return base_config(load_schema("synthetic"))


@pytest.fixture
def federation(tmp_path: Path, task_identity: None) -> tuple[Recording, dict[str, Any]]:
    """Four generated hospitals answering with fedadapt's ClientApp."""
    return _grid(tmp_path), _base()


def _channel(grid: InProcessGrid) -> SecureChannel:
    return SecureChannel(grid, threshold=0.67, neighbours=0, clip=1e9, timeout=30.0)


def _numbers(messages: list[Message]) -> np.ndarray:
    """Every number in the messages, masked vectors read as the sum they would be alone."""
    found: list[float] = []
    for m in messages:
        if m.has_error():
            continue
        for metrics in m.content.metric_records.values():
            for v in metrics.values():
                found += list(np.ravel(v))
        for arrays in m.content.array_records.values():
            for k in arrays:
                values = arrays[k].numpy()
                if values.dtype == np.uint64:
                    values = np.asarray(values).view(np.int64) * (2e9 / 2**52)
                found += list(np.ravel(values).astype(np.float64))
    return np.asarray(found, dtype=np.float64)


def _hidden(canary: np.ndarray, seen: np.ndarray, floor: float = 1.0) -> bool:
    """No distinctive value (above ``floor``) of the canary's sums is among those seen."""
    distinctive = canary[np.abs(canary) > floor]
    return bool(distinctive.size) and not np.any(
        np.isclose(seen[:, None], distinctive[None, :], rtol=1e-9, atol=0.0))


def test_the_stats_total_is_the_plain_merge_and_no_reply_shows_a_sites_sums(
        federation: tuple[Recording, dict[str, Any]]) -> None:
    """Stats: the secure total equals the merged plain summaries; the canary's sums hidden."""
    grid, base = federation
    nodes = sorted(grid.get_node_ids())
    features = list(load_schema("synthetic").shared_features)
    content = RecordDict({protocol.CONFIG: ConfigRecord(base)})
    outcome = _channel(grid).run(nodes, "stats", content)
    secure_seen = _numbers(grid.pulled)
    plain = query_sites(grid, nodes, protocol.STATS, content, timeout=30.0)
    keys = summary_keys(features)
    merged = merge_summaries([{k: [float(x) for x in np.ravel(
        r.content.metric_records[protocol.METRICS][k])] for k in keys} for r in plain.values()])
    assert outcome.result is not None
    total = summed.stats_total(outcome.result.total, features)
    bound = outcome.result.error_bound
    assert 0 < bound < 1e-5
    for key in keys:
        tol = bound
        if key.endswith(".m2"):  # from sums of squares, which a site's rounded sum enters
            tol = bound + 1e-8 * abs(merged[key][0])
        assert np.all(np.abs(np.subtract(total[key], merged[key])) <= tol), key
    canary = summed.stats_vector(plain[CANARY].content.metric_records[protocol.METRICS],
                                 features)
    assert _hidden(canary, secure_seen)
    assert _hidden(canary, _numbers(grid.pulled[-4:])) is False  # the plain reply shows it


def _train_content(grid: InProcessGrid, base: dict[str, Any], strategy: str
                   ) -> RecordDict:
    nodes = sorted(grid.get_node_ids())
    schema = load_schema("synthetic")
    content = RecordDict({protocol.CONFIG: ConfigRecord(base)})
    replies = query_sites(grid, nodes, protocol.STATS, content, timeout=30.0)
    keys = summary_keys(schema.shared_features)
    summary = merge_summaries([{k: [float(x) for x in np.ravel(
        r.content.metric_records[protocol.METRICS][k])] for k in keys} for r in replies.values()])
    prep = TabularPreprocessor(features=list(schema.shared_features)).fit_summary(summary)
    rng = np.random.default_rng(0)
    arrays = to_arrays(build_model("logreg", len(prep.feature_names_out_), 16, seed=1))
    for k in arrays:  # away from zero, so every sum is distinctive
        arrays[k] = type(arrays[k])(arrays[k].numpy() + rng.normal(0, 0.3, arrays[k].shape))
    return RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: ConfigRecord({
        **base, "preprocessing": json.dumps(prep.to_dict()), "local-epochs": 1,
        "learning-rate": 0.5, "batch-size": 0, "weight-decay": 0.001, "round-offset": 0,
        protocol.STRATEGY: strategy, protocol.SERVER_ROUND: 1})})


def _examples(reply: Message) -> float:
    n = reply.content.metric_records[protocol.METRICS][protocol.NUM_EXAMPLES]
    assert isinstance(n, int | float)
    return float(n)


def _round(grid: InProcessGrid, content: RecordDict, channel: SecureChannel | None
           ) -> list[Message]:
    nodes = sorted(grid.get_node_ids())
    site_grid = SiteGrid(grid, nodes, secure=channel)
    messages = [Message(content=content, dst_node_id=n, message_type=protocol.TRAIN)
                for n in nodes]
    return list(site_grid.send_and_receive(messages, timeout=30.0))


@pytest.mark.parametrize("strategy", ["newton", "fedavg"])
def test_a_training_round_sums_to_the_plain_aggregate_and_hides_each_site(
        federation: tuple[Recording, dict[str, Any]], strategy: str) -> None:
    """Newton's sums and FedAvg's weighted mean: one total reply, the canary's sums hidden."""
    grid, base = federation
    content = _train_content(grid, base, strategy)
    grid.pulled = []
    (total,) = _round(grid, content, _channel(grid))
    secure_seen = _numbers(grid.pulled)
    plain = {m.metadata.src_node_id: m for m in _round(grid, content, None)}
    assert len(plain) == 4 and total.metadata.src_node_id == 0
    got = total.content.array_records[protocol.ARRAYS]
    metrics = total.content.metric_records[protocol.METRICS]
    n = sum(_examples(m) for m in plain.values())
    assert metrics[protocol.NUM_EXAMPLES] == n
    for name in got:
        parts = [m.content.array_records[protocol.ARRAYS][name].numpy() for m in plain.values()]
        weights = [_examples(m) for m in plain.values()]
        want = (sum(parts) if strategy == "newton"
                else sum(w * p for w, p in zip(weights, parts, strict=True)) / n)
        assert np.max(np.abs(got[name].numpy() - want)) < 1e-5, name
    reply = plain[CANARY].content
    canary = (summed.newton_vector(
        {k: reply.array_records[protocol.ARRAYS][k].numpy() for k in (newton.GRAD, newton.HESS)},
        reply.metric_records[protocol.METRICS])
        if strategy == "newton" else np.concatenate([
            np.ravel(reply.array_records[protocol.ARRAYS][k].numpy())
            for k in reply.array_records[protocol.ARRAYS]]))
    if strategy == "fedavg":  # its weights, and its weights times its examples
        n_site = _examples(plain[CANARY])
        canary = np.concatenate([canary, canary * n_site])
    assert _hidden(canary, secure_seen, floor=1e-3)


def _silent_at(stage: str) -> Any:
    """A site that answers every message but the given stage of a secure sum (it died)."""

    def handle(msg: Message, context: Any) -> Message | None:
        record = msg.content.config_records.get(protocol.SECAGG_RECORD)
        if record is not None and record.get(protocol.STAGE) == stage:
            return None
        return site_app(msg, context)

    return handle


def test_a_site_lost_after_sharing_its_keys_leaves_the_others_exact_total(
        tmp_path: Path, task_identity: None) -> None:
    """Newton round, one site silent from the masked stage on: the other three's sums."""
    grid = _grid(tmp_path, {102: _silent_at("masked")})
    content = _train_content(grid, _base(), "newton")
    channel = SecureChannel(grid, threshold=0.67, neighbours=0, clip=1e9, timeout=1.0)
    site_grid = SiteGrid(grid, [101, 102, 103, 104], secure=channel)
    (total,) = site_grid.send_and_receive(
        [Message(content=content, dst_node_id=n, message_type=protocol.TRAIN)
         for n in (101, 102, 103, 104)], timeout=1.0)
    assert site_grid.sums[1]["lost_after_keys"] == ["node-102"] and 102 in site_grid.dropped
    others = _round(grid, content, None)
    others = [m for m in others if m.metadata.src_node_id != 102]
    assert len(others) == 3
    for name in (newton.GRAD, newton.HESS):
        want = sum(m.content.array_records[protocol.ARRAYS][name].numpy() for m in others)
        got = total.content.array_records[protocol.ARRAYS][name].numpy()
        assert np.max(np.abs(got - want)) <= site_grid.sums[1]["error_bound"] * 4


@pytest.mark.parametrize("stage", ["share", "masked"])
def test_too_few_survivors_abort_the_round_with_no_total(
        tmp_path: Path, task_identity: None, stage: str) -> None:
    """Two of four silent from a stage on (threshold 3): no reply; only they are dropped."""
    grid = _grid(tmp_path, {102: _silent_at(stage), 103: _silent_at(stage)})
    content = _train_content(grid, _base(), "newton")
    channel = SecureChannel(grid, threshold=0.67, neighbours=0, clip=1e9, timeout=1.0)
    site_grid = SiteGrid(grid, [101, 102, 103, 104], secure=channel)
    replies = site_grid.send_and_receive(
        [Message(content=content, dst_node_id=n, message_type=protocol.TRAIN)
         for n in (101, 102, 103, 104)], timeout=1.0)
    assert list(replies) == []
    assert f"{stage} stage: 2 site(s) answered, fewer than the threshold 3" in site_grid.aborted[1]
    assert sorted(site_grid.dropped) == [102, 103]


def test_a_site_requiring_secagg_refuses_plain_sums_and_answers_masked_ones(
        tmp_path: Path, task_identity: None) -> None:
    """Policy require-secagg: a plain stats request refused by that rule; a secure sum works."""
    policy = tmp_path / "policy.toml"
    policy.write_text("require-secagg = true\n", encoding="utf-8")
    manifest = generate(tmp_path / "data", n_sites=3, seed=11)
    contexts = {101 + i: Context(run_id=7, node_id=101 + i, state=RecordDict(), run_config={},
                                 node_config={"simulated": True, "site-name": name,
                                              "data-file": str(manifest.parent / f"{name}.csv"),
                                              "site-dir": str(tmp_path / name),
                                              "policy": str(policy)})
                for i, name in enumerate(("hospital-a", "hospital-b", "hospital-c"))}
    grid = Recording(contexts, site_app, run_id=7)
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({protocol.CONFIG: ConfigRecord(_base())})
    plain = query_sites(grid, nodes, protocol.STATS, content, timeout=30.0)
    assert all(r.has_error() and r.error.code == protocol.REFUSED
               and "require-secagg" in str(r.error.reason) for r in plain.values())
    outcome = _channel(grid).run(nodes, "stats", content)
    assert outcome.result is not None and outcome.result.survivors == tuple(nodes)


def test_a_window_of_two_messages_in_flight_gives_the_same_total(
        federation: tuple[Recording, dict[str, Any]]) -> None:
    """max-in-flight applies to every stage: the same total, never more than two out."""
    grid, base = federation
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({protocol.CONFIG: ConfigRecord(base)})
    pushed: list[int] = []
    push = grid.push_messages

    def counting(messages: Iterable[Message]) -> list[str]:
        batch = list(messages)
        pushed.append(len(batch))
        return push(batch)

    grid.push_messages = counting  # type: ignore[method-assign]
    narrow = SecureChannel(grid, threshold=0.67, neighbours=0, clip=1e9, timeout=30.0,
                           window=2).run(nodes, "stats", content)
    assert pushed and max(pushed) == 2
    pushed.clear()
    wide = _channel(grid).run(nodes, "stats", content)
    assert max(pushed) == 4
    assert narrow.result is not None and wide.result is not None
    assert np.allclose(narrow.result.total, wide.result.total, rtol=0, atol=1e-6)


def test_a_batch_of_key_pairs_serves_several_sums_each_pair_once(
        federation: tuple[Recording, dict[str, Any]]) -> None:
    """Three sums, one keys exchange; a site refuses a pair named a second time."""
    from client.contract import parse_stage
    from client.secagg import SecAggRefused
    from client.secure_reply import answer

    grid, base = federation
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({protocol.CONFIG: ConfigRecord(base)})
    channel = SecureChannel(grid, threshold=0.67, neighbours=0, clip=1e9, timeout=30.0, sums=3)
    grid.pulled = []
    totals = [channel.run(nodes, "stats", content).result for _ in range(3)]
    stages = [m.content.config_records[protocol.SECAGG_RECORD] for m in grid.pulled]
    assert len(stages) == 4 * (1 + 3 * 3)  # keys once, then share, masked, unmask each time
    assert all(t is not None for t in totals)
    assert np.allclose(totals[0].total, totals[2].total, rtol=0, atol=1e-5)  # type: ignore[union-attr]
    again = Message(RecordDict({protocol.SECAGG_RECORD: ConfigRecord({
        protocol.STAGE: "share", protocol.SUM_ID: "x", "batch": channel.batch, "index": 1,
        "nodes": [], "pk1": [], "pk2": [], "threshold": 2})}), dst_node_id=101,
        message_type=protocol.SECAGG)
    with pytest.raises(SecAggRefused, match="used already"):
        answer(parse_stage(again), 101, grid.contexts[101].state)
