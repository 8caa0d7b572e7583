"""Peak memory of a process tree: the summed RSS of a process and all its descendants.

A Flower run is many processes (SuperLink, SuperExec, the simulation process and ray's
workers, SuperNodes, ClientApps), most of them short-lived or started by other processes;
the peak of their summed resident memory is what a machine must have. :class:`PeakRss`
samples it with psutil in a background thread; :func:`measure_command` runs a command under
it. A process once seen in the tree is counted until it exits, also after it left the tree
(Flower's SuperExec and ray's workers are re-parented to init while a run shuts down). RSS
counts shared pages (libraries, ray's shared-memory object store) once per process that maps
them, so the sum overstates physical use; a process that lives shorter than one
sampling interval may be missed.

Measuring this process itself (a benchmark worker timing one call), the meter also reads the
kernel's own high-water mark of its RSS (Linux: reset on entry through
``/proc/self/clear_refs``, read on exit as ``VmHWM``), so a spike shorter than the sampling
interval still counts; :attr:`PeakRss.increase_gib` is then the call's own memory.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from deploy.process_guard import die_with_parent, guard
from deploy.processes import stop_process

GIB = float(1024**3)
STATUS = Path("/proc/self/status")


def _reset_own_peak() -> bool:
    """Make the kernel's peak RSS of this process its current RSS (Linux); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _own_peak_bytes() -> int:
    """The kernel's peak RSS of this process since the last reset (``VmHWM``), in bytes."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{STATUS} has no VmHWM")


def tree_rss(pid: int, *, include_root: bool = True) -> tuple[int, int]:
    """Summed RSS of a process and its descendants, now.

    Parameters
    ----------
    pid : int
        The root process.
    include_root : bool
        Count the root itself (else only its descendants).

    Returns
    -------
    rss : int
        Bytes; 0 when the root is gone.
    count : int
        Number of processes counted (zombies and processes gone meanwhile are left out).
    """
    try:
        root = psutil.Process(pid)
        procs = root.children(recursive=True)
    except psutil.Error:
        return 0, 0
    if include_root:
        procs.insert(0, root)
    total = count = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += int(p.memory_info().rss)
            count += 1
    return total, count


class PeakRss:
    """Context manager: the peak summed RSS of a process tree, sampled every ``interval`` s.

    A descendant seen once stays counted (with what it starts) until it exits, even if it
    is re-parented out of the tree.

    Parameters
    ----------
    pid : int, optional
        Root of the tree (default: this process).
    interval : float
        Seconds between samples.
    include_root : bool
        Count the root itself; ``False`` measures only what it started (for a harness that
        runs the measured processes from a bigger Python process).

    Examples
    --------
    >>> with PeakRss() as peak:
    ...     pass
    >>> peak.peak_gib >= 0
    True
    """

    def __init__(self, pid: int | None = None, *, interval: float = 0.2,
                 include_root: bool = True) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.pid = os.getpid() if pid is None else pid
        self.interval = interval
        self.include_root = include_root
        self.peak_bytes = 0
        self.start_bytes = 0
        self.peak_processes = 0
        self.samples = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._started = 0.0
        self._known: dict[int, psutil.Process] = {}
        self._kernel_peak = False

    @property
    def peak_gib(self) -> float:
        """The peak so far, in GiB."""
        return self.peak_bytes / GIB

    @property
    def increase_gib(self) -> float:
        """The peak above the summed RSS at the start (what the measured block added), GiB."""
        return max(0, self.peak_bytes - self.start_bytes) / GIB

    def members(self) -> list[psutil.Process]:
        """The processes counted now: the tree, and those seen in it before that still run."""
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.pid)
            found = {p.pid: p for p in root.children(recursive=True)}
        except psutil.Error:
            root = None
        for pid, p in list(self._known.items()):
            if pid in found:
                continue
            if not p.is_running():  # also false if the pid was reused by another process
                del self._known[pid]
                continue
            found[pid] = p
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    found.setdefault(child.pid, child)
        self._known.update(found)
        if root is not None and self.include_root:
            found[root.pid] = root
        return list(found.values())

    def sample(self) -> int:
        """Take one sample now; return its summed RSS in bytes."""
        rss = count = 0
        for p in self.members():
            with contextlib.suppress(psutil.Error):
                rss += int(p.memory_info().rss)
                count += 1
        with self._lock:
            self.peak_bytes = max(self.peak_bytes, rss)
            self.peak_processes = max(self.peak_processes, count)
            self.samples += 1
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> PeakRss:
        if self._thread is not None:
            raise RuntimeError("PeakRss is already running")
        own = self.include_root and self.pid == os.getpid()
        if own:
            gc.collect()  # garbage left by earlier work is not the block's
        self._kernel_peak = own and _reset_own_peak()
        self._started = time.monotonic()
        self.start_bytes = self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.seconds = time.monotonic() - self._started
        if self._kernel_peak:
            with contextlib.suppress(OSError, ValueError), self._lock:
                self.peak_bytes = max(self.peak_bytes, _own_peak_bytes())

    def as_dict(self) -> dict[str, Any]:
        """The measurement for a report: peak GiB, peak process count, samples, seconds."""
        return {"peak_rss_gib": self.peak_gib, "peak_processes": self.peak_processes,
                "samples": self.samples, "interval_s": self.interval}


@dataclass(frozen=True)
class CommandPeak:
    """What :func:`measure_command` saw of a command."""

    returncode: int | None
    wall_s: float
    peak_rss_gib: float
    peak_processes: int
    timed_out: bool


def measure_command(
    cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
    timeout: float | None = None, interval: float = 0.2, log_path: Path | None = None,
) -> CommandPeak:
    """Run a command; return its wall time and the peak summed RSS of its process tree.

    The command runs in a session of its own, its output in ``log_path`` (else discarded).
    Whatever it started is stopped when it exits, times out, or this process is
    interrupted (also processes that left its tree: they carry the process guard's mark).

    Parameters
    ----------
    cmd : list of str
        The command and its arguments.
    cwd : Path, optional
        Its working directory.
    env : dict, optional
        Its environment (default: this process's).
    timeout : float, optional
        Seconds after which it is stopped (``timed_out`` is then true).
    interval : float
        Seconds between memory samples.
    log_path : Path, optional
        Where its stdout and stderr go.

    Returns
    -------
    CommandPeak
        Exit code (``None`` if it had to be killed and did not report one), wall seconds,
        peak GiB (the command's own process included), peak process count, whether it timed
        out.
    """
    timed_out = False
    with contextlib.ExitStack() as stack:
        mark = stack.enter_context(guard())
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            sink: Any = stack.enter_context(log_path.open("w", encoding="utf-8"))
        else:
            sink = subprocess.DEVNULL
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, env={**(env or os.environ), **mark},
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
        try:
            with PeakRss(proc.pid, interval=interval) as peak:
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
        finally:
            stop_process(proc, cmd[0])
        wall = time.monotonic() - t0
    return CommandPeak(returncode=proc.returncode, wall_s=wall, peak_rss_gib=peak.peak_gib,
                       peak_processes=peak.peak_processes, timed_out=timed_out)
