"""The slow tests' no-leftovers check counts only the processes the test itself started."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from deploy.process_guard import marked

MARK = "FEDADAPT_TEST_PROCESS"  # as in conftest.py


def _fake_flower(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A process that looks like a SuperLink (``ps`` shows flower-superlink)."""
    return subprocess.Popen(["bash", "-c", "exec -a flower-superlink sleep 30"], env=env)


def test_another_flower_job_is_not_a_leftover(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Flower process started by someone else is ignored; one started by the test is found."""
    monkeypatch.setenv(MARK, "this-test")
    foreign_env = {k: v for k, v in os.environ.items() if k != MARK}
    foreign, ours = _fake_flower(foreign_env), _fake_flower(dict(os.environ))
    try:
        deadline = time.monotonic() + 5  # the shell may be between fork and exec
        found: list[int] = []
        while ours.pid not in found and time.monotonic() < deadline:
            found = [p.pid for p in marked(MARK, "this-test")]
            time.sleep(0.05)
        assert ours.pid in found
        assert foreign.pid not in found
    finally:
        for p in (foreign, ours):
            p.kill()
            p.wait()
    assert ours.pid not in [p.pid for p in marked(MARK, "this-test")]
