"""Progress of a run as JSON lines in the output folder, for whoever watches the run."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from shared.files import append_private

log = logging.getLogger(__name__)

EVENTS_FILE = "events.jsonl"


class Progress:
    """Append one JSON object per event (phase started, round done, run finished).

    The ServerApp runs in a process of its own (the SuperLink's); a command that started the
    run follows its progress by reading this file.
    """

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        append_private(self.path, "")  # appended to: a resumed run's events follow the last
        self.t0 = time.monotonic()
        self.closed = False

    def emit(self, event: str, **fields: Any) -> None:
        """Record an event with its fields (aggregates and identifiers only)."""
        if self.closed:
            return
        record = {"event": event, "t": round(time.monotonic() - self.t0, 3),
                  "time": round(time.time(), 3), **fields}
        append_private(self.path, json.dumps(record, default=str) + "\n")

    def close(self) -> None:
        """Record nothing more (the run was stopped: "stopped" stays the last event)."""
        self.closed = True
