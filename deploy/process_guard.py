"""Nothing a fedadapt command started outlives it, even when the command itself is killed.

Every process a command starts (SuperLink, ``flwr run``, SuperNodes) gets an environment
variable with a token of this command; whatever those start in turn (Flower's SuperExec, the
simulation process, ray's workers, ClientApps) inherits it, even after it leaves the process
tree (Flower's processes start sessions of their own, and are re-parented when their parent
exits). On a normal exit, Ctrl-C or SIGTERM the command stops its processes in order and then
stops any marked process left over. For SIGKILL, which the command cannot catch, a small
watchdog process started first does the same as soon as the command is gone.

Written by hand because no library offers it: ``subprocess`` and ``psutil`` see process trees,
and Flower's processes escape them; Linux cgroups (systemd-run) would need privileges.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from types import FrameType

import psutil

log = logging.getLogger(__name__)

MARK = "FEDADAPT_COMMAND"
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child, before exec: get SIGTERM when the thread that started it dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def marked(variable: str, token: str) -> list[psutil.Process]:
    """Running processes (not this one) whose environment has ``variable=token``.

    Parameters
    ----------
    variable, token : str
        The environment variable and its value.

    Returns
    -------
    list of psutil.Process
        Zombies, processes gone meanwhile and processes of other users are left out.
    """
    found = []
    for p in psutil.process_iter():
        if p.pid == os.getpid():
            continue
        try:
            if p.environ().get(variable) == token and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, OSError):
            continue
    return found


def stop_marked(token: str, grace: float = 5.0) -> list[str]:
    """SIGTERM every process marked with ``token``; SIGKILL those alive after ``grace``.

    Returns
    -------
    list of str
        ``name (pid)`` of each process that had to be stopped here.
    """
    procs = {p.pid: p for p in marked(MARK, token)}
    # Ray starts its agents with an environment of its own (no mark): they are found as
    # children of the marked raylet instead.
    for p in list(procs.values()):
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in p.children(recursive=True)})
    procs.pop(os.getpid(), None)
    names = []
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.name()} (pid {p.pid})")
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)
    return names


@contextlib.contextmanager
def guard() -> Iterator[dict[str, str]]:
    """Mark what is started inside; stop whatever is left of it on exit or if killed.

    Yields
    ------
    dict
        Environment variables to give every process started inside the block.
    """
    token = uuid.uuid4().hex
    watchdog = subprocess.Popen(
        [sys.executable, "-m", "deploy.process_guard", str(os.getpid()), token],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, preexec_fn=die_with_parent,
    )
    try:
        yield {MARK: token}
    finally:
        left = stop_marked(token)
        if left:
            log.warning("stopped %d process(es) left over: %s", len(left), ", ".join(left))
        watchdog.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=10)


def _watch(parent: int, token: str) -> None:
    """The watchdog: wait until ``parent`` is gone (or SIGTERM), then stop its processes."""
    done = []

    def finish(signum: int, frame: FrameType | None) -> None:
        done.append(signum)

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the command's to handle
    while not done and os.getppid() == parent and psutil.pid_exists(parent):
        time.sleep(0.5)
    stop_marked(token)


if __name__ == "__main__":  # the watchdog: ``python -m deploy.process_guard PARENT TOKEN``
    _watch(int(sys.argv[1]), sys.argv[2])
