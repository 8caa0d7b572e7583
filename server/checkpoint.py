"""The coordinator's checkpoint: an interrupted run resumes from its last completed round.

After every training round the ServerApp writes, atomically, the run's fingerprint (every
setting that changes results, and the schema), the repeats already finished, the rounds
completed in the current repeat and the model after the last of them. A restarted run with
the same fingerprint and the same output folder picks up after that round: no round is run or
counted twice. A finished run removes its checkpoint, so the next run starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from shared.files import write_atomically
from shared.settings import RunSettings

log = logging.getLogger(__name__)

FORMAT = 2  # of what the checkpoint stores per repeat (server.summary.RepeatResult)

# Settings that do not change the numbers: a run may resume with other values of these.
NEUTRAL = {"out", "resume", "record-replies", "reply-timeout", "phase-timeout",
           "node-wait-timeout",
           "min-sites", "expected-sites"}


def fingerprint(settings: RunSettings, schema_digest: str) -> str:
    """SHA-256 of everything that determines a run's results."""
    config = {k: v for k, v in settings.to_run_config().items() if k not in NEUTRAL}
    # The state's format is part of it: a checkpoint written by another version of what a
    # repeat records is not resumed.
    blob = json.dumps({"settings": config, "schema": schema_digest, "format": FORMAT},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class Checkpoint:
    """Read and write ``OUT/checkpoint/state.json`` for one run fingerprint."""

    def __init__(self, out: Path, key: str) -> None:
        self.folder = out / "checkpoint"
        self.path = self.folder / "state.json"
        self.key = key
        self.closed = False
        self.ignored = ""  # why an existing checkpoint was not resumed, if one was not

    def load(self) -> dict[str, Any] | None:
        """The saved state of this run, or None (none saved, or another run's)."""
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            self.ignored = f"unreadable ({type(err).__name__})"
            log.warning("checkpoint %s %s: starting from the beginning", self.path, self.ignored)
            return None
        if state.get("key") != self.key:
            self.ignored = "of a run with other settings"
            log.warning("checkpoint %s belongs to a run with other settings: not resuming",
                        self.path)
            return None
        return dict(state)

    def save(self, state: dict[str, Any]) -> None:
        """Replace the saved state (atomically: a crash leaves the old or the new one)."""
        if self.closed:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps({**state, "key": self.key}).encode("utf-8"))

    def clear(self) -> None:
        """Remove the checkpoint once the run is complete."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        """Remove the checkpoint and save nothing more (the run was abandoned)."""
        self.closed = True
        self.clear()
