"""Reply checks before aggregation: unsound replies are dropped and named, never averaged."""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.guarded import GuardedFedAvg, reply_problem
from shared import protocol

SHAPES = {"net.weight": (1, 3), "net.bias": (1,)}


def _reply(node: int, weight: Any = None, n: float = 100.0, **metrics: float) -> Message:
    """A train reply from ``node``, as a site would send it."""
    w = np.full((1, 3), 1.0) if weight is None else np.asarray(weight, dtype=float)
    arrays = ArrayRecord({"net.weight": Array(w), "net.bias": Array(np.zeros(1))})
    values: dict[str, int | float | list[int] | list[float]] = {
        protocol.NUM_EXAMPLES: n, "train-loss": 0.5, "global-loss": 0.6, **metrics}
    msg = Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=node,
                  message_type=protocol.TRAIN)
    content = RecordDict({protocol.ARRAYS: arrays, protocol.METRICS: MetricRecord(values)})
    return Message(content=content, reply_to=msg)


def test_reply_problem_names_each_defect(task_identity: None) -> None:
    """NaN weights, wrong shapes, absurd counts and non-finite losses are all caught."""
    assert reply_problem(_reply(1), SHAPES) is None
    assert "NaN" in str(reply_problem(_reply(1, weight=[[np.nan, 0, 0]]), SHAPES))
    assert "infinite" in str(reply_problem(_reply(1, weight=[[np.inf, 0, 0]]), SHAPES))
    assert "shapes" in str(reply_problem(_reply(1, weight=[[1.0, 2.0]]), SHAPES))
    for n in (-5.0, 0.0, 2.5, 1e12):
        assert "num-examples" in str(reply_problem(_reply(1, n=n), SHAPES))
    assert "not finite" in str(reply_problem(_reply(1, **{"train-loss": float("nan")}), SHAPES))


def test_guarded_fedavg_drops_bad_replies_and_weights_by_examples(task_identity: None) -> None:
    """The aggregate is the example-weighted mean of the sound replies only."""
    seen: list[Any] = []
    strategy = GuardedFedAvg(
        shapes=SHAPES, site_names={1: "a", 2: "b", 3: "evil"},
        on_round=lambda rnd, arrays, metrics, rejected: seen.append((rnd, rejected)),
        min_train_nodes=1, min_available_nodes=1,
    )
    replies = [
        _reply(1, weight=[[1.0, 1.0, 1.0]], n=100),
        _reply(2, weight=[[4.0, 4.0, 4.0]], n=300),
        _reply(3, weight=[[np.nan, 1e9, 0.0]], n=10_000),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    np.testing.assert_allclose(arrays["net.weight"].numpy(), [[3.25, 3.25, 3.25]])
    assert seen == [(1, ["evil"])]
    assert strategy.rejected[1] == ["evil"]


def test_a_round_without_sound_replies_keeps_the_model(task_identity: None) -> None:
    """If every reply is unsound, nothing is aggregated (the model stays as it was)."""
    strategy = GuardedFedAvg(shapes=SHAPES, site_names={}, min_train_nodes=1,
                             min_available_nodes=1)
    assert strategy.aggregate_train(1, [_reply(1, n=-1.0)]) == (None, None)
