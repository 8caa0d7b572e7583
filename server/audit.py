"""What the coordinator received from each site: one JSON line per reply, in ``replies.jsonl``.

Always: the message type, the sending node, the reply's size on the wire (``bytes``), and for
each record its keys, array shapes and sizes in bytes. With ``record-replies = true`` also the
values (all aggregates or source-model weights, by the sites' egress rules): the proof that no
reply carries anything else is made on this file.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message

from shared.files import append_private
from shared.wire import wire_bytes  # also measures the sites' audit


class ReplyLog:
    """Append a line per reply received.

    Parameters
    ----------
    path : Path
        The JSON-lines file.
    values : bool
        Also record every number and string of each reply.
    """

    def __init__(self, path: Path, values: bool = False) -> None:
        self.path = path
        self.values = values
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, replies: Mapping[int, Message],
               context: dict[str, Any] | None = None) -> None:
        """Record replies by the node each was sent to (error replies too: type and reason).

        ``context`` is added to every line: the training round, and the ids of the messages
        sent in the same exchange (each reply names the message it answers).
        """
        now = round(time.time(), 3)  # when the coordinator had them (the status page)
        lines = [json.dumps({**(context or {}), "time": now, **self._entry(node, r)},
                            allow_nan=True)
                 for node, r in replies.items()]
        if not lines:
            return
        with self._lock:
            append_private(self.path, "\n".join(lines) + "\n")

    def _entry(self, node: int, reply: Message) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "type": reply.metadata.message_type,
            "node": node,
            "reply_to": reply.metadata.reply_to_message_id,
        }
        if reply.has_error():
            entry["error"] = str(reply.error.reason)
            return entry
        entry["bytes"] = wire_bytes(reply)
        content = reply.content
        entry["arrays"] = {
            name: {k: {"shape": list(rec[k].shape), "bytes": len(rec[k].data),
                       **({"values": _floats(rec[k].numpy().ravel().tolist())}
                          if self.values else {})}
                   for k in rec}
            for name, rec in content.array_records.items()
        }
        entry["metrics"] = {
            name: ({k: _floats(v) for k, v in rec.items()} if self.values else sorted(rec))
            for name, rec in content.metric_records.items()
        }
        entry["configs"] = {
            name: ({k: str(v) for k, v in rec.items()} if self.values else sorted(rec))
            for name, rec in content.config_records.items()
        }
        return entry


def _floats(value: Any) -> Any:
    """Numbers as JSON can hold them (NaN written as null)."""
    if isinstance(value, list):
        return [_floats(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
