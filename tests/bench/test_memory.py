"""The process-tree memory sampler: summed RSS of a tree, peaks, re-parented processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.memory import GIB, PeakRss, measure_command, tree_rss

MIB = 1024 * 1024
# Touches every page (b"x" * n writes them), so the child's RSS really grows by ~n bytes.
HOLD = "import sys, time; block = b'x' * ({mib} * 1024 * 1024); time.sleep({secs})"


def _holder(mib: int, secs: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", HOLD.format(mib=mib, secs=secs)])


def _wait_rss(proc: subprocess.Popen[bytes], at_least: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while psutil.Process(proc.pid).memory_info().rss < at_least:
        assert time.monotonic() < deadline, "the child never reached its size"
        time.sleep(0.05)


def test_tree_rss_counts_the_root_and_its_children() -> None:
    alone, count = tree_rss(os.getpid())
    assert alone > 0 and count >= 1
    child = _holder(120, 30)
    try:
        _wait_rss(child, 110 * MIB)
        with_child, count_with = tree_rss(os.getpid())
        only_children, n_children = tree_rss(os.getpid(), include_root=False)
    finally:
        child.kill()
        child.wait()
    assert with_child - alone > 100 * MIB
    assert count_with >= count + 1
    assert 100 * MIB < only_children < with_child and n_children >= 1


def test_tree_rss_of_a_process_that_is_gone_is_zero() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert tree_rss(proc.pid) == (0, 0)


def test_peak_rss_keeps_the_peak_after_the_child_exits() -> None:
    with PeakRss(include_root=False, interval=0.05) as peak:
        child = _holder(150, 1.0)
        _wait_rss(child, 140 * MIB)
        time.sleep(0.3)  # a few samples at full size
        child.wait(timeout=30)
        time.sleep(0.2)
    assert peak.peak_bytes > 140 * MIB
    assert peak.peak_gib == pytest.approx(peak.peak_bytes / GIB)
    assert peak.peak_processes >= 1 and peak.samples >= 3
    assert peak.seconds > 1.0
    assert peak.as_dict()["peak_rss_gib"] == peak.peak_gib
    # Nothing is left running, and a fresh sample of an empty tree is smaller than the peak.
    assert peak.sample() < peak.peak_bytes


def test_peak_rss_of_a_tree_without_children_is_only_the_root() -> None:
    with PeakRss(interval=0.05) as peak:
        time.sleep(0.2)
    own = psutil.Process().memory_info().rss
    assert 0.5 * own < peak.peak_bytes < 2 * own
    assert peak.peak_processes >= 1


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux only")
def test_measuring_itself_a_spike_between_two_samples_still_counts() -> None:
    """Measuring itself, the peak is the kernel's high-water mark: no sample needs to see it."""
    with PeakRss(interval=60.0) as peak:  # one sample at the start, none during the spike
        block = b"x" * (150 * MIB)  # written, so resident
        del block
    assert peak.samples == 1
    assert peak.increase_gib * GIB > 140 * MIB
    assert peak.peak_bytes >= peak.start_bytes + 140 * MIB


def test_a_re_parented_descendant_stays_counted(tmp_path: Path) -> None:
    """A grandchild whose parent exits leaves the tree; it is counted until it exits."""
    pid_file = tmp_path / "grandchild.pid"
    script = (
        "import subprocess, sys, pathlib\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "sys.stdin.read()\n"  # exits when the test closes stdin
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    grandchild: psutil.Process | None = None
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        grandchild = psutil.Process(int(pid_file.read_text()))
        peak = PeakRss(include_root=False)
        assert grandchild.pid in {p.pid for p in peak.members()}
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
        assert grandchild.pid not in {
            p.pid for p in psutil.Process().children(recursive=True)}
        assert grandchild.pid in {p.pid for p in peak.members()}
        grandchild.kill()
        grandchild.wait(timeout=10)
        assert grandchild.pid not in {p.pid for p in peak.members()}
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if grandchild is not None and grandchild.is_running():
            grandchild.kill()


def test_peak_rss_refuses_a_bad_interval_and_a_second_start() -> None:
    with pytest.raises(ValueError, match="interval"):
        PeakRss(interval=0)
    with PeakRss() as peak, pytest.raises(RuntimeError, match="already running"):
        peak.__enter__()


def test_measure_command_reports_the_command_s_peak(tmp_path: Path, no_leftovers: None) -> None:
    log = tmp_path / "logs" / "cmd.log"
    result = measure_command([sys.executable, "-c", HOLD.format(mib=150, secs=1.5)
                              + "; print('done')"], interval=0.05, log_path=log)
    assert result.returncode == 0 and not result.timed_out
    assert result.peak_rss_gib > 140 * MIB / GIB
    assert result.peak_processes >= 1
    assert result.wall_s >= 1.5
    assert log.read_text().strip() == "done"


def test_measure_command_stops_a_command_that_takes_too_long(no_leftovers: None) -> None:
    # The command starts a child of its own: both must be gone when measure_command returns.
    result = measure_command(["bash", "-c", "sleep 60 & sleep 60"], timeout=1.0)
    assert result.timed_out
    assert result.wall_s < 30
