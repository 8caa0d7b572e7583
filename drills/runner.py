"""``fedadapt drill``: run scenarios, print a table, write ``drills.json``."""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drills.base import DRILLS, DrillResult
from server.report import to_jsonable
from shared.files import write_atomically

log = logging.getLogger(__name__)


def load_drills() -> None:
    """Import the scenario modules (each registers its drills)."""
    from drills import (  # noqa: F401
        curious,
        data,
        network,
        policy,
        privacy,
        processes,
        replies,
        secure,
        storage,
        unapproved_app,
    )


def run_drills(names: Sequence[str], out: Path) -> list[DrillResult]:
    """Run the named drills (all when empty), each in its own folder; write drills.json.

    A drill that crashes is reported as failed with the error; the others still run. ``out``
    may be relative: Flower's processes run elsewhere, so every path handed to them is made
    absolute here.
    """
    out = out.resolve()
    load_drills()
    unknown = [n for n in names if n not in DRILLS]
    if unknown:
        raise ValueError(f"unknown drill(s) {unknown}; known: {', '.join(DRILLS)}")
    results = []
    for name in names or list(DRILLS):
        d = DRILLS[name]
        t0 = time.monotonic()
        log.info("drill %s: starting", name)
        try:
            result = d.run(out / name)
        except Exception as err:  # a drill must not take the others down
            log.error("drill %s crashed:\n%s", name, traceback.format_exc())
            result = DrillResult(name, d.expected, f"the drill itself failed: "
                                 f"{type(err).__name__}: {err}", False, {})
        result.expected = d.expected
        if result.skipped:
            log.warning("drill %s skipped: %s", name, result.skipped)
        result.details["seconds"] = round(time.monotonic() - t0, 1)
        results.append(result)
        write(results, out)
    return results


def write(results: Sequence[DrillResult], out: Path) -> Path:
    """``drills.json``: a list of {scenario, expected, observed, passed, figure, details, skipped}.

    ``skipped`` is the reason a drill could not run on this machine (``null`` when it ran).
    """
    out.mkdir(parents=True, exist_ok=True)
    payload: list[Any] = to_jsonable([r.to_json() for r in results])
    return write_atomically(out / "drills.json", json.dumps(payload, indent=2).encode("utf-8"))
