"""Reliability drills about processes (real deployments) and replies (both engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drills.base import DRILLS, Engine
from drills.replies import poisoned_replies, straggler
from drills.runner import load_drills

load_drills()


@pytest.mark.slow
@pytest.mark.full
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["site-killed", "too-few-sites", "coordinator-restart",
                                  "secagg-dropout"])
def test_drill(name: str, tmp_path: Path, no_leftovers: None) -> None:
    """The drill's expected outcome is observed, with its figure."""
    result = DRILLS[name].run(tmp_path)
    assert result.passed, result.observed
    assert result.figure, "every drill reports a figure"


def test_poisoned_replies(tmp_path: Path, engine: Engine, no_leftovers: None) -> None:
    """Poisoned replies are rejected every round; trimmed mean resists one wildly wrong site."""
    result = poisoned_replies(tmp_path, engine=engine)
    assert result.passed, result.observed
    assert result.figure, "every drill reports a figure"


def test_straggler(tmp_path: Path, engine: Engine, no_leftovers: None) -> None:
    """A site slower than the reply timeout misses that round only; its late reply is unused.

    In-process the straggler sleeps in its own thread and the reply timeout is real time, as in
    Flower's engine: the same drill, the same pass condition.
    """
    result = straggler(tmp_path, engine=engine)
    assert result.passed, result.observed
    assert result.figure, "every drill reports a figure"
