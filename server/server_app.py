"""The coordinator's Flower ServerApp: reads the settings, runs the phases, writes the report."""

from __future__ import annotations

import logging
import os
import threading
from importlib.metadata import version

import psutil
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import RunNotRunningException

import shared
from server.audit import ReplyLog
from server.checkpoint import Checkpoint
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
    stop = StopWatch(progress, checkpoint)
    try:
        audit = ReplyLog(out / "replies.jsonl", values=settings.record_replies)
        report = run_federation(grid, settings, progress, config, audit, checkpoint)
    except RunNotRunningException:
        stop.stopped()
        raise
    except Exception as err:
        if stop.end("failed"):
            progress.emit("failed", error=f"{type(err).__name__}: {err}")
        raise
    if not stop.end("finished"):
        return  # stopped while the last phase ran: no report of a run nobody wants
    paths = write_report(report, out)
    if checkpoint is not None:
        checkpoint.clear()  # complete: the next run with these settings starts afresh
    log.info("report written to %s", paths["json"])
    progress.emit("finished", report=str(paths["json"]), seconds=report["timing_s"]["total"])


class StopWatch:
    """Notice when Flower stops this run (``flwr stop``) and forget its checkpoint then.

    Flower stops a run by raising SIGINT in the ServerApp's process (its task heartbeat learns
    that the run no longer runs); its handler calls the exit handlers registered with
    ``flwr.supercore.exit.add_exit_handler``: the one hook that works whether the ServerApp
    runs in the main thread (deployed) or in a thread of the simulation, which may go on for a
    moment while the process exits. Flower's parent-process monitor raises SIGINT too when
    the SuperLink's process dies: a crash, after which the run must resume; so a shutdown
    while the parent is gone is not taken as a stop.

    A stopped run's checkpoint is removed (otherwise the next run with the same settings would
    resume a run nobody wants any more), the progress file says "stopped" last, and no report
    is written.
    """

    def __init__(self, progress: Progress, checkpoint: Checkpoint | None) -> None:
        from flwr.supercore.exit import add_exit_handler

        self.progress = progress
        self.checkpoint = checkpoint
        self.outcome = "running"
        self._lock = threading.Lock()
        self._parent = os.getppid()
        add_exit_handler(self._on_exit, run_before_force_exit=True)

    def _on_exit(self) -> None:
        if os.getppid() == self._parent and psutil.pid_exists(self._parent):
            self.stopped()

    def end(self, outcome: str) -> bool:
        """Record that the run ended by itself; False if it had been stopped first."""
        with self._lock:
            if self.outcome != "running":
                return False
            self.outcome = outcome
            return True

    def stopped(self) -> None:
        """The run was stopped on purpose: forget the checkpoint, say so, write nothing more."""
        if not self.end("stopped"):
            return
        if self.checkpoint is not None:
            self.checkpoint.close()
        self.progress.emit("stopped", error="the run was stopped (flwr stop); no report was "
                           "written and its checkpoint was removed")
        self.progress.close()
        log.warning("the run was stopped; its checkpoint was removed")
