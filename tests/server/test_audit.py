"""The coordinator's reply log: one line per reply, its size on the wire, values only if asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.audit import ReplyLog, wire_bytes


def _reply() -> Message:
    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=5,
                   message_type="train")
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(100, dtype=np.float64))}),
                          "metrics": MetricRecord({"num-examples": 12.0})})
    return Message(content, reply_to=sent)


def test_each_reply_is_logged_with_its_wire_size(tmp_path: Path, task_identity: None) -> None:
    """Keys, shapes, array bytes and the whole reply's bytes; no value without record-replies."""
    log = ReplyLog(tmp_path / "replies.jsonl")
    reply = _reply()
    log.record({5: reply}, {"round": 3})
    (line,) = (tmp_path / "replies.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert entry["node"] == 5 and entry["round"] == 3
    assert entry["arrays"]["arrays"]["w"]["shape"] == [100]
    assert entry["arrays"]["arrays"]["w"]["bytes"] >= 800
    assert entry["bytes"] == wire_bytes(reply)
    assert 800 < entry["bytes"] < 800 + 2048  # the array plus a little framing
    assert entry["metrics"] == {"metrics": ["num-examples"]}
    assert "values" not in entry["arrays"]["arrays"]["w"]
