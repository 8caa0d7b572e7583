"""Attack 3: a tiny preprocessing scale overflows a row's norm; NaN or not tells who is there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.egress import EgressViolation, build_reply
from drills.curious import (
    EPSILON,
    TARGET_AGE,
    World,
    _newton_config,
    _threshold_model,
    deployed_site,
    overflow_probe,
    within_bound,
)
from shared import protocol


@pytest.mark.parametrize("scale", [1e-152, 1e-153, 1e-200])
def test_the_overflow_probe_gets_a_finite_answer_whoever_is_in_the_file(
    world: World, tmp_path: Path, scale: float
) -> None:
    """Inputs are clipped into the site's bound: the same finite kind of answer either way."""
    for data in (world.without, world.with_target):
        site = deployed_site(tmp_path / data.stem, data)
        prep, arrays = _threshold_model(world.schema, "age", TARGET_AGE - 0.25, scale=scale)
        reply = site.ask("train", _newton_config(world.schema, prep, **{
            "dp": "record", "dp-epsilon": EPSILON, "dp-delta": 1e-5, "dp-clip": 1.0,
            "num-server-rounds": 1, "repeats": 1}), arrays)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        sent = reply.content.array_records[protocol.ARRAYS]
        assert all(np.isfinite(sent[k].numpy()).all() for k in sent)
    # As a game (landed main: the attacker was right every time): at chance now.
    outcome = overflow_probe(world, tmp_path / "game", trials=30)
    assert within_bound(outcome, chance_only=True)


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
def test_weights_that_are_not_finite_or_absurd_are_refused_before_any_row_is_read(
    world: World, tmp_path: Path, value: float
) -> None:
    """The refusal names the weights and does not depend on the file: both files alike."""
    reasons = set()
    for data in (world.without, world.with_target):
        site = deployed_site(tmp_path / f"{data.stem}-{value}", data)
        prep, arrays = _threshold_model(world.schema, "age", 50.0)
        weight = arrays["net.weight"].numpy().copy()
        weight[0, 1] = value
        crafted = ArrayRecord({"net.weight": Array(weight), "net.bias": arrays["net.bias"]})
        config = _newton_config(world.schema, prep, **{
            "dp": "record", "dp-epsilon": 1.0, "dp-delta": 1e-5, "dp-clip": 1.0,
            "num-server-rounds": 1, "repeats": 1})
        reply = site.ask("train", config, crafted)
        assert reply.has_error() and "must be finite and at most" in str(reply.error.reason)
        reasons.add(str(reply.error.reason))
    assert len(reasons) == 1


def test_egress_refuses_a_reply_holding_a_number_that_is_not_finite(
    task_identity: None
) -> None:
    """Arrays and metrics alike; an undefined AUC is left out, never sent as NaN."""
    sent = ArrayRecord({"net.weight": Array(np.zeros((1, 2))), "net.bias": Array(np.zeros(1))})
    msg = Message(content=RecordDict({protocol.ARRAYS: sent, protocol.CONFIG: ConfigRecord(
        {"preprocessing": json.dumps({})})}), dst_node_id=1, message_type=protocol.TRAIN)
    bad = ArrayRecord({"net.weight": Array(np.array([[np.nan, 0.0]])),
                       "net.bias": Array(np.zeros(1))})
    with pytest.raises(EgressViolation, match="not finite"):
        build_reply(msg, shared_features=[], metrics={"num-examples": 5.0}, arrays=bad)
    with pytest.raises(EgressViolation, match="not finite"):
        build_reply(msg, shared_features=[], metrics={"num-examples": np.inf}, arrays=sent)
    evaluate = Message(content=RecordDict({}), dst_node_id=1,
                       message_type=protocol.EVALUATE)
    reply = build_reply(evaluate, shared_features=[],
                        metrics={"num-examples": 5.0, "local.auc": float("nan")})
    assert dict(reply.content.metric_records[protocol.METRICS]) == {"num-examples": 5.0}
