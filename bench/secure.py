"""What secure aggregation costs: a secure sum at many sites, a deployed round with and without.

The ``secagg`` part of ``fedadapt bench`` (docs/benchmarks.md):

- **many sites, in one process**: one secure sum of a Newton reply (``VALUES`` numbers: a
  50-weight model's gradient and Hessian sums and two counts) over the in-process grid, every
  site answering with its real stage functions (``client.secure_reply``) and the
  coordinator's real channel (``server.secure_rounds``); CPU seconds of all of them
  together, wall seconds, and the bytes one site sends and receives (the messages as Flower
  serialises them);
- **a deployed round**: ``deploy-local`` (TLS, real processes) of the same sites, FedAvg
  rounds, with and without ``secagg``: the median round's wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared import newton, protocol
from shared.wire import wire_bytes

WEIGHTS = 50  # a Newton reply of a model with 50 weights: gradient, Hessian, two counts
VALUES = WEIGHTS + WEIGHTS * (WEIGHTS + 1) // 2 + 2
CLIP = 1e6


def _site(vector: np.ndarray, cpu: list[float]) -> Callable[[Message, Context], Message]:
    """A site answering the stages with its real stage functions, summing ``vector``.

    The CPU seconds of its answers are added to ``cpu[0]``.
    """

    def handle(msg: Message, context: Context) -> Message:
        t = time.process_time()
        try:
            return _answer(msg, context, vector)
        finally:
            cpu[0] += time.process_time() - t

    return handle


def _answer(msg: Message, context: Context, vector: np.ndarray) -> Message:
    """One stage's reply; the masked stage masks ``vector`` as a Newton reply."""
    from client.contract import parse_stage
    from client.secure_reply import answer, masked_vector

    stage = parse_stage(msg)
    node = int(msg.metadata.dst_node_id)
    if stage.name != "masked":
        values = answer(stage, node, context.state)
        return Message(RecordDict({protocol.SECAGG_RECORD: ConfigRecord(values)}),
                       reply_to=msg)
    d = WEIGHTS
    plain = Message(RecordDict({
        protocol.ARRAYS: ArrayRecord({newton.GRAD: Array(vector[:d]),
                                      newton.HESS: Array(vector[d:-2])}),
        protocol.METRICS: MetricRecord({"num-examples": float(vector[-2]),
                                        "loss-sum": float(vector[-1])})}), reply_to=msg)
    masked = masked_vector(stage, node, context.state, plain, True, [], [])
    return Message(RecordDict({protocol.ARRAYS: masked}), reply_to=msg)


class _Metered:
    """The in-process grid, counting the bytes each site receives and sends."""

    def __init__(self, grid: Any) -> None:
        self.grid = grid
        self.bytes: dict[int, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def push_messages(self, messages: Any) -> list[str]:
        """Push, counting each message at its site."""
        messages = list(messages)
        for m in messages:
            node = m.metadata.dst_node_id
            self.bytes[node] = self.bytes.get(node, 0) + wire_bytes(m)
        return list(self.grid.push_messages(messages))

    def pull_messages(self, ids: Any) -> list[Message]:
        """Pull, counting each reply at the site that sent it."""
        replies = list(self.grid.pull_messages(ids))
        for r in replies:
            node = r.metadata.src_node_id
            self.bytes[node] = self.bytes.get(node, 0) + wire_bytes(r)
        return replies


def secure_sum_cost(sites: int, neighbours: int, seed: int = 0) -> dict[str, Any]:
    """One secure sum of ``VALUES`` numbers at ``sites`` in-process sites.

    Returns
    -------
    dict
        ``sites``, ``neighbours``, ``cpu_s`` (every site and the coordinator),
        ``site_cpu_s`` (one site's, the mean), ``coordinator_cpu_s``, ``wall_s``,
        ``bytes_per_site`` (median, sent and received), ``max_error`` against the exact sum
        and the stated ``error_bound``.
    """
    from server.secure_rounds import SecureChannel
    from simulations.inprocess import InProcessGrid, task_identity

    rng = np.random.default_rng(seed)
    nodes = list(range(101, 101 + sites))
    vectors = {n: rng.normal(0.0, 100.0, VALUES) for n in nodes}
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config={}) for n in nodes}
    with task_identity(1):
        sites_cpu = [0.0]
        grid = InProcessGrid(contexts, ClientApp(),
                             {n: _site(vectors[n], sites_cpu) for n in nodes})
        metered = _Metered(grid)
        channel = SecureChannel(metered, threshold=0.67,  # type: ignore[arg-type]
                                neighbours=neighbours, clip=CLIP, timeout=600.0)
        cpu, wall = time.process_time(), time.perf_counter()
        outcome = channel.run(nodes, "train", RecordDict())
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert outcome.result is not None
    exact = np.sum([vectors[n] for n in nodes], axis=0)
    per_site = sorted(metered.bytes.get(n, 0) for n in nodes)
    return {"sites": sites, "neighbours": neighbours or sites - 1, "values": VALUES,
            "cpu_s": cpu, "site_cpu_s": sites_cpu[0] / sites,
            "coordinator_cpu_s": cpu - sites_cpu[0], "wall_s": wall,
            "bytes_per_site": per_site[len(per_site) // 2],
            "max_error": float(np.max(np.abs(outcome.result.total - exact))),
            "error_bound": outcome.result.error_bound}


def deployed_rounds(out: Path, sites: int = 4, rounds: int = 3) -> dict[str, Any]:
    """A deployed run's median round time (FedAvg), without and with secure aggregation."""
    from deploy.local import deploy_local
    from shared.settings import RunSettings
    from simulations.datasets import sites_for_run

    out.mkdir(parents=True, exist_ok=True)
    policy = out / "policy.toml"
    policy.write_text("require-dp = false\n", encoding="utf-8")
    result: dict[str, Any] = {"sites": sites, "rounds": rounds}
    for label, secagg in (("plain", False), ("secagg", True)):
        settings = RunSettings(num_server_rounds=rounds, strategy="fedavg", secagg=secagg,
                               min_group_sites=0)
        report = deploy_local(sites_for_run("synthetic", out / label, sites, settings),
                              out / label, settings, data="synthetic", site_policy=policy,
                              site_exec=False)
        latencies = sorted(report["deployment"]["round_latency_s"])
        result[label] = {"median_round_s": latencies[len(latencies) // 2] if latencies
                         else None, "train_s": report["timing_s"]["train"],
                         "stats_s": report["timing_s"]["stats"]}
    return result
