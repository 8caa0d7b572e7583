"""Flower's commands as processes of ours: started in a session of their own, stopped whole.

A command (``flower-superlink``, ``flower-supernode``, ``flwr run``) is started with
:func:`spawn`, its output in a log file; :func:`stop_process` stops it and everything it
started, in order; :func:`submit_run` submits the fedadapt app to a running SuperLink with
``flwr run --stream``, follows the ServerApp's progress file and returns the report. The
simulation (``simulations.superlink``) and the local deployment (``deploy.local``) both run
Flower this way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import psutil

from deploy.process_guard import die_with_parent
from shared.errors import FedadaptError

log = logging.getLogger(__name__)

EventHook = Callable[[dict[str, Any]], None]

APP_DIR = Path(__file__).resolve().parent.parent  # the fedadapt Flower app (pyproject.toml)
EVENTS_FILE = "events.jsonl"  # written by server.progress
STARTUP_TIMEOUT = 60.0

FLOWER_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    # Otherwise the SuperLink runs `uv sync` of the app's dependencies (it would fetch torch).
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


class FlowerRunError(FedadaptError, RuntimeError):
    """A Flower process or run did not start or complete; the message says where its logs are."""


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_bin(name: str) -> str:
    """Path of a Flower command installed beside this Python (the project's environment)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def write_run_config(path: Path, run_config: dict[str, Any]) -> Path:
    """Write run-config overrides as TOML (``flwr run --run-config FILE``)."""
    import tomli_w

    path.write_text(tomli_w.dumps(run_config), encoding="utf-8")
    return path


def spawn(cmd: list[str], *, cwd: Path, env: dict[str, str], log_path: Path,
          append: bool = False) -> subprocess.Popen[Any]:
    """Start a Flower process in a session of its own, its output in ``log_path``.

    Its own session: a Ctrl-C in the terminal reaches only fedadapt, which then stops the
    process in order (:func:`stop_process`). It also stops if fedadapt is killed.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a" if append else "w", encoding="utf-8") as sink:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)


def _label(p: psutil.Process) -> str:
    """What a process is, for people: its command (a Python script's name), else its name."""
    try:
        args = p.cmdline()
        script = next((a for a in args[1:2] if not a.startswith("-")), "")
        return Path(script).name if "python" in Path(args[0]).name and script else p.name()
    except (psutil.Error, IndexError):
        return "process"


def stop_process(proc: subprocess.Popen[Any] | None, name: str, grace: float = 10.0) -> None:
    """Stop a process and everything it started, and wait until all of it is gone.

    Flower's SuperLink starts its SuperExec and the simulation process in sessions of their
    own (so a process-group signal misses them); they exit when they notice their parent is
    gone. The whole tree is therefore recorded first, the root is asked to stop (SIGTERM),
    and any process of the tree still alive after ``grace`` seconds is killed.
    """
    if proc is None or proc.poll() is not None:
        return
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    # The root stops its own children first; what is left after half the grace (ray's agents,
    # the simulation process) is asked directly, then killed.
    _, alive = psutil.wait_procs(tree, timeout=grace / 2)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(alive, timeout=grace / 2)
    for p in alive:
        log.warning("%s (pid %d, started by %s) did not stop within %.0f s; killing it",
                    _label(p), p.pid, name, grace)
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    proc.wait(timeout=grace)


def kill_tree(proc: subprocess.Popen[Any] | None) -> None:
    """Kill a process and everything it started at once (SIGKILL: a crash, not a shutdown)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=10)
    proc.wait(timeout=10)


def submit_run(
    env: dict[str, str],
    connection: str,
    run_config: dict[str, Any],
    out: Path,
    *,
    on_event: EventHook | None = None,
    timeout: float = 3600.0,
    extra: list[str] | None = None,
    app_dir: Path = APP_DIR,
) -> dict[str, Any]:
    """Submit the app with ``flwr run`` to a running SuperLink, follow it, return the report.

    ``env`` holds the ``FLWR_HOME`` whose ``config.toml`` names ``connection``.

    Raises
    ------
    FlowerRunError
        If the run failed, was stopped, timed out or wrote no report; the message names logs.
    """
    proc, run_log = start_run(env, connection, run_config, out, extra=extra, app_dir=app_dir)
    try:
        last = _follow(proc, out / EVENTS_FILE, on_event, timeout, run_log)
    finally:
        stop_process(proc, "flwr run")
    if last.get("event") in ("failed", "stopped"):
        raise FlowerRunError(f"the run {last['event']}: {last.get('error')}; logs in "
                             f"{out / 'logs'}")
    report = out / "report.json"
    if last.get("event") != "finished" or not report.exists():
        raise FlowerRunError(f"the run ended without a report; see {run_log}")
    return dict(json.loads(report.read_text(encoding="utf-8")))


def start_run(
    env: dict[str, str], connection: str, run_config: dict[str, Any], out: Path, *,
    extra: list[str] | None = None, app_dir: Path = APP_DIR,
) -> tuple[subprocess.Popen[Any], Path]:
    """Start ``flwr run --stream`` in the background; return the process and its log."""
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in (out / EVENTS_FILE, out / "report.json"):
        stale.unlink(missing_ok=True)
    config_file = write_run_config(
        Path(env["FLWR_HOME"]) / "run-config.toml", {**run_config, "out": str(out)}
    )
    run_log = logs / "flwr-run.log"
    proc = spawn([flower_bin("flwr"), "run", str(app_dir), connection, "--stream",
                  "--run-config", str(config_file), *(extra or [])],
                 cwd=APP_DIR, env=env, log_path=run_log, append=True)
    return proc, run_log


def _follow(
    proc: subprocess.Popen[Any], events: Path, on_event: EventHook | None, timeout: float,
    run_log: Path,
) -> dict[str, Any]:
    """Follow the progress file until the run finishes, fails, or ``flwr run`` exits."""
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    handle: TextIO | None = None
    try:
        while True:
            if handle is None and events.exists():
                handle = events.open(encoding="utf-8")
            for line in handle.readlines() if handle else []:
                if not line.strip():
                    continue
                last = json.loads(line)
                if on_event is not None:
                    on_event(last)
            if last.get("event") in ("finished", "failed", "stopped"):
                return last
            if proc.poll() is not None:
                # `flwr run --stream` exits 0 even when the ServerApp failed; read what is left.
                for line in handle.readlines() if handle else []:
                    if line.strip():
                        last = json.loads(line)
                        if on_event is not None:
                            on_event(last)
                return last
            if time.monotonic() > deadline:
                raise FlowerRunError(f"the run took longer than {timeout:.0f} s; see {run_log}")
            time.sleep(0.2)
    finally:
        if handle is not None:
            handle.close()
