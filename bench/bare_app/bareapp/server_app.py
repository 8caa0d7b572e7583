"""The bare ServerApp: Flower's FedAvg over every node, no federated evaluation.

It times each round (from sampling the nodes to the aggregated model) and, when the run
config names an ``out`` folder, writes ``bare-result.json`` there after every round (``finished``
is true once all rounds are done).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.run import Run

log = logging.getLogger(__name__)
RESULT_FILE = "bare-result.json"

app = ServerApp()


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, recording how long each round took and how many nodes replied."""

    def __init__(self, on_round: Callable[[], None] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[dict[str, Any]] = []
        self.on_round = on_round
        self._started = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Start the round's clock, then sample and build the messages as FedAvg does."""
        self._started = time.monotonic()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate as FedAvg does, then record the round."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        loss = metrics.get("train-loss") if metrics is not None else None
        self.rounds.append({
            "round": server_round,
            "seconds": time.monotonic() - self._started,
            "replies": len(replies),
            "errors": sum(1 for r in replies if r.has_error()),
            "train_loss": float(loss) if isinstance(loss, int | float) else None,
        })
        if self.on_round is not None:
            self.on_round()
        return arrays, metrics


class PollingGrid(Grid):
    """A grid whose ``send_and_receive`` pulls replies every ``poll`` s (growing to 0.5 s).

    Flower's deployed grid sleeps 3 s between pulls; fedadapt's ServerApp polls like this.
    Everything else is the wrapped grid's.
    """

    def __init__(self, grid: Grid, poll: float) -> None:
        self._grid = grid
        self._poll = poll

    def set_run(self, run: Run) -> None:
        """Delegate to the wrapped grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        """Delegate to the wrapped grid (deprecated in Flower)."""
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """Delegate to the wrapped grid."""
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Delegate to the wrapped grid."""
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate to the wrapped grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate to the wrapped grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push the messages, then pull the replies until all arrived or ``timeout`` passed."""
        ids = set(self._grid.push_messages(messages))
        deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        poll = self._poll
        while ids:
            got = list(self._grid.pull_messages(ids))
            replies += got
            ids -= {m.metadata.reply_to_message_id for m in got}
            if not ids or (timeout is not None and time.monotonic() >= deadline):
                break
            time.sleep(poll)
            poll = min(poll * 1.5, 0.5)
        return replies


def wait_for_nodes(grid: Grid, expected: int, timeout: float) -> int:
    """Wait until ``expected`` nodes are connected; raise after ``timeout`` seconds.

    Returns
    -------
    int
        Number of connected nodes.
    """
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {connected} of {expected} nodes connected after "
                               f"{timeout:.0f} s")
        time.sleep(0.5)
    return connected


def write_result(out: str, result: dict[str, Any]) -> None:
    """Write ``bare-result.json`` into the folder ``out`` (atomically); nothing if empty."""
    if not out:
        return
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RESULT_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    tmp.replace(folder / RESULT_FILE)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg of a zero-initialised logistic regression for ``num-server-rounds`` rounds."""
    t0 = time.monotonic()
    cfg = context.run_config
    n_inputs = int(cfg["n-inputs"])
    expected = int(cfg["expected-nodes"])
    nodes = wait_for_nodes(grid, expected, float(cfg["node-wait-timeout"]))
    waited = time.monotonic() - t0
    poll = float(cfg["poll-interval"])
    if poll > 0:
        grid = PollingGrid(grid, poll)
    minimum = expected if expected > 0 else 2  # FedAvg's default otherwise
    out = str(cfg["out"])
    times: dict[str, float] = {"train_seconds": 0.0}

    def report(finished: bool = False) -> None:
        write_result(out, {
            "finished": finished, "nodes": nodes, "expected_nodes": expected,
            "wait_seconds": waited, **times, "serverapp_seconds": time.monotonic() - t0,
            "poll_interval": poll, "rounds": strategy.rounds,
        })

    strategy = TimedFedAvg(on_round=report, fraction_train=1.0, fraction_evaluate=0.0,
                           min_train_nodes=minimum, min_available_nodes=minimum)
    initial = ArrayRecord({"weight": Array(np.zeros((1, n_inputs), dtype=np.float32)),
                           "bias": Array(np.zeros(1, dtype=np.float32))})
    t1 = time.monotonic()
    strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=int(cfg["num-server-rounds"]),
        timeout=float(cfg["reply-timeout"]),
        train_config=ConfigRecord({"local-steps": int(cfg["local-steps"]),
                                   "learning-rate": float(cfg["learning-rate"])}),
    )
    times["train_seconds"] = time.monotonic() - t1
    log.info("bare: %d rounds over %d nodes in %.2f s", len(strategy.rounds), nodes,
             times["train_seconds"])
    report(finished=True)
