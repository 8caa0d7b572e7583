"""The coordinator's Flower ServerApp: reads the settings, runs the phases, writes the report."""

from __future__ import annotations

import logging
from importlib.metadata import version

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import shared
from server.audit import ReplyLog
from server.federation import make_checkpoint, resolve_out, run_federation
from server.progress import Progress
from server.report import write_report
from shared import logs
from shared.settings import RunSettings

log = logging.getLogger(__name__)
logs.configure()

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run fedadapt's phases over the connected sites and write the report."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    out = resolve_out(settings.out)
    progress = Progress(out)
    checkpoint = make_checkpoint(out, settings)
    if checkpoint is None or checkpoint.load() is None:  # a resumed run keeps its reply log
        (out / "replies.jsonl").unlink(missing_ok=True)
    config = {
        **settings.to_run_config(),
        "fedadapt_version": shared.__version__,
        "flwr_version": version("flwr"),
        "run_id": context.run_id,
    }
    try:
        audit = ReplyLog(out / "replies.jsonl", values=settings.record_replies)
        report = run_federation(grid, settings, progress, config, audit, checkpoint)
    except Exception as err:
        progress.emit("failed", error=f"{type(err).__name__}: {err}")
        raise
    paths = write_report(report, out)
    if checkpoint is not None:
        checkpoint.clear()  # complete: the next run with these settings starts afresh
    log.info("report written to %s", paths["json"])
    progress.emit("finished", report=str(paths["json"]), seconds=report["timing_s"]["total"])
