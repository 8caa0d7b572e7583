"""One fedadapt run, driven by the coordinator: wait for the sites, run every repeat, resume."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from server.audit import ReplyLog
from server.checkpoint import Checkpoint, fingerprint
from server.groups import group_phase
from server.phases import Repeat, RunFailed, site_phases, stats_phase, train_phase
from server.progress import Progress
from server.sites import wait_for_sites
from server.summary import RepeatResult, build_report
from shared.arrays import arrays_from_json, arrays_to_json
from shared.schema import load_schema
from shared.settings import RunSettings

log = logging.getLogger(__name__)

__all__ = ["RunFailed", "resolve_out", "run_federation"]


def run_federation(
    grid: Grid, settings: RunSettings, progress: Progress, config_record: dict[str, Any],
    audit: ReplyLog | None = None, checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    """Run every repeat of the pipeline over the connected sites and return the report.

    Parameters
    ----------
    grid : Grid
        Flower's grid to the sites.
    settings : RunSettings
        The run's settings.
    progress : Progress
        Where progress events go.
    config_record : dict
        Everything to record under the report's ``config``.
    audit : ReplyLog, optional
        Where every reply received is recorded.
    checkpoint : Checkpoint, optional
        Where progress is saved after every round, and resumed from.

    Returns
    -------
    dict
        The report (see docs/report.md, ``report.json``).
    """
    t0 = time.monotonic()
    schema = load_schema(settings.schema)
    progress.emit("waiting", min_sites=settings.min_sites, expected=settings.sites_to_wait_for)
    nodes = wait_for_sites(grid, settings.min_sites, settings.node_wait_timeout,
                           expected=settings.sites_to_wait_for)
    progress.emit("sites", count=len(nodes))
    state = checkpoint.load() if checkpoint is not None else None
    if checkpoint is not None and checkpoint.ignored:
        progress.emit("checkpoint-ignored", reason=checkpoint.ignored,
                      path=str(checkpoint.path))
    results = [RepeatResult(**r) for r in state["completed"]] if state else []
    if state:
        progress.emit("resumed", repeat=len(results), round=state.get("round", 0))
        log.info("resuming: %d repeat(s) done, %d round(s) of the next", len(results),
                 state.get("round", 0))
    for repeat in range(len(results), settings.repeats):
        rep = Repeat(grid, schema, settings, progress, audit,
                     RepeatResult(repeat=repeat, split_seed=settings.split_seed(repeat)),
                     run_id=int(config_record.get("run_id", 0)))
        prep = stats_phase(rep, nodes)
        prep_digest = _digest(prep.to_dict())
        start, done = None, 0
        if state and state.get("repeat") == repeat and state.get("round", 0) > 0:
            if state.get("prep") == prep_digest:
                start, done = arrays_from_json(state["arrays"]), int(state["round"])
                rep.result.rounds = list(state["rounds"])
            else:
                log.warning("the sites' data changed since the checkpoint: repeat %d starts "
                            "again from round 1", repeat)

        def save(rnd: int, arrays: ArrayRecord, rep: Repeat = rep, digest: str = prep_digest,
                 ) -> None:
            if checkpoint is not None:
                checkpoint.save({"completed": [asdict(r) for r in results], "repeat": rep.result
                                 .repeat, "round": rnd, "prep": digest,
                                 "arrays": arrays_to_json(arrays), "rounds": rep.result.rounds})

        model = train_phase(rep, prep, start, done, save)
        site_phases(rep, prep, model, group_phase(rep, prep, model))
        results.append(rep.result)
        if checkpoint is not None:
            checkpoint.save({"completed": [asdict(r) for r in results], "repeat": repeat + 1,
                             "round": 0})
        state = None
    return build_report(config_record, results, time.monotonic() - t0)


def _digest(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def resolve_out(out: str) -> Path:
    """The output folder: absolute, or relative to where the ServerApp runs."""
    return Path(out).expanduser().resolve()


def make_checkpoint(out: Path, settings: RunSettings) -> Checkpoint | None:
    """The run's checkpoint in ``out``, or None when resuming is switched off."""
    if not settings.resume:
        return None
    return Checkpoint(out, fingerprint(settings, load_schema(settings.schema).digest()))
