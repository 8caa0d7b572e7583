"""Client-level DP (dp = "client"): clipped site updates, server noise, accounting, a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.client_app import app as client_app
from client.jobs import clip_update
from client.site import read_manifest
from server.client_dp import GuardedClientSideDP
from server.federation import run_federation
from server.guarded import Release
from server.progress import Progress
from server.report.markdown import render_markdown
from server.strategy import make_strategy
from shared import protocol
from shared.dp_accounting import ALPHAS, epsilon_spent, noise_multiplier
from shared.settings import RunSettings, SettingsError
from simulations.generator import generate
from simulations.inprocess import InProcessGrid, manifest_contexts

D = 5000
SHAPES = {"w": (D,)}


def _reply(node: int, w: np.ndarray, unit: float = 1.0) -> Message:
    """A dp = client train reply from ``node``, as a site sends it."""
    msg = Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=node,
                  message_type=protocol.TRAIN)
    metrics = MetricRecord({protocol.NUM_EXAMPLES: 100.0, "train-loss": 0.5,
                            "global-loss": 0.6, protocol.UNIT_WEIGHT: unit})
    content = RecordDict({protocol.ARRAYS: ArrayRecord({"w": Array(w)}),
                          protocol.METRICS: metrics})
    return Message(content=content, reply_to=msg)


def _strategy(z: float, clip: float, sites: int, hook: Any = None) -> GuardedClientSideDP:
    settings = RunSettings(dp="client", strategy="fedavg", dp_clip=clip, num_server_rounds=4)
    strategy = make_strategy(settings, sites, SHAPES, {i: f"s{i}" for i in range(1, sites + 1)},
                             hook)
    assert isinstance(strategy, GuardedClientSideDP)
    strategy.noise_multiplier = z  # a known z instead of the calibrated one
    return strategy


def test_clip_update_bounds_the_update_and_keeps_small_ones() -> None:
    """The update (trained - received) is scaled to norm dp-clip if larger, else kept."""
    rng = np.random.default_rng(0)
    received = ArrayRecord({"a": Array(rng.normal(size=(2, 3))), "b": Array(rng.normal(size=3))})
    big = ArrayRecord({k: Array(received[k].numpy() + 5.0) for k in received})
    clipped = clip_update(big, received, 0.7)
    update = np.concatenate([(clipped[k].numpy() - received[k].numpy()).ravel()
                             for k in received])
    assert list(clipped.keys()) == ["a", "b"]
    assert np.linalg.norm(update) == pytest.approx(0.7)
    direction = np.concatenate([np.full(6, 5.0), np.full(3, 5.0)])
    np.testing.assert_allclose(update, 0.7 * direction / np.linalg.norm(direction))
    small = ArrayRecord({k: Array(received[k].numpy() + 1e-3) for k in received})
    same = clip_update(small, received, 0.7)
    for k in received:
        np.testing.assert_allclose(same[k].numpy(), small[k].numpy())


def test_server_noise_has_std_z_clip_over_sites_and_weights_are_uniform(
    task_identity: None,
) -> None:
    """The released average = uniform mean of the sound updates + N(0, (z C / m)^2).

    Seeded: Flower draws the noise from numpy's global generator. A site claiming a weight
    other than 1.0 is rejected, and the noise then scales with the m sites averaged.
    """
    seen: list[Any] = []
    strategy = _strategy(z=1.5, clip=2.0, sites=4,
                         hook=lambda rnd, arrays, metrics, rejected: seen.append(rejected))
    base = [np.full(D, float(i)) for i in range(4)]  # uniform mean 1.5 (weighted would differ)
    np.random.seed(0)
    arrays, _ = strategy.aggregate_train(1, [_reply(i + 1, w) for i, w in enumerate(base)])
    assert arrays is not None
    noise = arrays["w"].numpy() - 1.5
    expected = 1.5 * 2.0 / 4
    assert abs(noise.mean()) < 4 * expected / math.sqrt(D)
    assert noise.std() == pytest.approx(expected, rel=0.05)  # sd of the sd estimate: 1 %
    assert strategy.outcome.released[1] == Release(sites=4, noise_std=expected)
    assert strategy.outcome.noise_multiplier == 1.5
    assert seen == [[]]
    # Round 2: site 4 claims weight 10 (it would dominate the average): rejected, m = 3.
    replies = [_reply(i + 1, w) for i, w in enumerate(base[:3])] + [_reply(4, base[3], 10.0)]
    arrays, _ = strategy.aggregate_train(2, replies)
    assert arrays is not None
    noise = arrays["w"].numpy() - 1.0
    assert noise.std() == pytest.approx(1.5 * 2.0 / 3, rel=0.05)
    assert seen[-1] == ["s4"]


def test_the_wrapper_sends_the_clipping_norm(task_identity: None) -> None:
    """Flower's wrapper adds clipping_norm (= dp-clip) to the train config it sends."""
    strategy = _strategy(z=1.0, clip=0.3, sites=2)
    grid = InProcessGrid({1: Context(1, 1, {}, RecordDict(), {}),
                          2: Context(1, 2, {}, RecordDict(), {})}, client_app)
    messages = list(strategy.configure_train(1, ArrayRecord({"w": Array(np.zeros(D))}),
                                             ConfigRecord({"dp": "client", "dp-clip": 0.3}),
                                             grid))
    assert len(messages) == 2
    config = messages[0].content.config_records[protocol.CONFIG]
    assert config["clipping_norm"] == 0.3 and config["dp-clip"] == 0.3


def test_epsilon_is_opacus_rdp_of_the_gaussian_mechanism() -> None:
    """Sample rate 1: RDP alpha T / (2 z^2), converted as Opacus does (Balle et al. 2020).

    z = 1 over 50 rounds at delta 1e-5 is about 57; calibration gives a z whose epsilon is
    just below the target.
    """
    def closed_form(z: float, rounds: int, delta: float) -> float:
        a = np.asarray(ALPHAS, dtype=float)
        eps = a * rounds / (2 * z**2) - (math.log(delta) + np.log(a)) / (a - 1) + np.log(
            (a - 1) / a)
        return float(np.nanmin(eps))

    def epsilon_after(z: float, rounds: int, delta: float) -> float:
        return epsilon_spent([(z, 1.0, rounds)], delta)  # every site in every round

    for z, rounds in ((1.0, 50), (2.0, 30), (5.0, 100)):
        assert epsilon_after(z, rounds, 1e-5) == pytest.approx(closed_form(z, rounds, 1e-5))
    assert epsilon_after(1.0, 50, 1e-5) == pytest.approx(57, abs=1.0)
    z = noise_multiplier(3.0, 1e-5, 1.0, 30)
    assert 2.9 <= epsilon_after(z, 30, 1e-5) <= 3.0


def test_client_dp_needs_fedavg_or_fedprox() -> None:
    """Client-level DP with Newton, fedmedian or fedtrimmedavg is a clear settings error."""
    for strategy in ("newton", "fedmedian", "fedtrimmedavg"):
        with pytest.raises(SettingsError, match="dp = client"):
            RunSettings.from_run_config({"dp": "client", "strategy": strategy})
    assert RunSettings.from_run_config({"dp": "client"}).training == "fedavg"
    assert RunSettings.from_run_config({"dp": "client", "strategy": "fedprox"}).training == (
        "fedprox")
    with pytest.raises(SettingsError, match="dp = client"):
        make_strategy(RunSettings(dp="client", strategy="newton"), 2, SHAPES, {})


def test_a_client_dp_run_completes_with_clipped_replies_and_reports_epsilon(
    tmp_path: Path,
) -> None:
    """An in-process run with dp = client completes, and reports its epsilon.

    Each site's reply update has norm <= dp-clip (as sent, after the audit), the report
    carries the run's epsilon per round, and report.md shows it.
    """
    manifest = read_manifest(generate(tmp_path / "data", n_sites=4, seed=3))
    contexts = manifest_contexts(manifest, tmp_path, {})
    norms: list[float] = []

    def recording(msg: Message, context: Context) -> Message:
        reply: Message = client_app(msg, context)
        if msg.metadata.message_type == protocol.TRAIN and not reply.has_error():
            sent = msg.content.array_records[protocol.ARRAYS]
            got = reply.content.array_records[protocol.ARRAYS]
            norms.append(float(np.sqrt(sum(
                np.sum((got[k].numpy() - sent[k].numpy()) ** 2) for k in sent))))
            assert reply.content[protocol.METRICS][protocol.UNIT_WEIGHT] == 1.0
        return reply

    grid = InProcessGrid(contexts, client_app, handlers=dict.fromkeys(contexts, recording))
    settings = RunSettings.from_run_config({
        "num-server-rounds": 3, "min-sites": 2, "node-wait-timeout": 1.0, "dp": "client",
        "dp-epsilon": 3.0, "dp-clip": 0.05})
    report = run_federation(grid, settings, Progress(tmp_path / "out"), {"test": True})
    assert len(norms) == 12 and max(norms) <= 0.05 + 1e-9
    assert max(norms) == pytest.approx(0.05)  # the clip binds: 5 epochs move further
    dp = report["dp"]
    assert dp["mode"] == "client" and dp["clipping_norm"] == 0.05
    assert [r["round"] for r in dp["per_round"]] == [1, 2, 3]
    assert all(r["sites"] == 4 for r in dp["per_round"])
    assert dp["epsilon"] == pytest.approx(epsilon_spent([(dp["noise_multiplier"], 1.0, 3)], 1e-5))
    assert 2.9 <= dp["epsilon"] <= 3.0
    assert dp["per_round"][0]["noise_std"] == pytest.approx(dp["noise_multiplier"] * 0.05 / 4)
    assert all(s["status"] == "ok" and "dp" not in s for s in report["sites"].values())
    assert "## Differential privacy (client level)" in render_markdown(report)
