"""Reliability drills about processes and replies, run for real (slow, bounded, clean)."""

from __future__ import annotations

from pathlib import Path

import pytest

from drills.base import DRILLS
from drills.runner import load_drills

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

load_drills()


@pytest.mark.parametrize("name", ["site-killed", "too-few-sites", "coordinator-restart",
                                  "poisoned-replies", "straggler"])
def test_drill(name: str, tmp_path: Path, no_leftovers: None) -> None:
    """The drill's expected outcome is observed, with its figure."""
    result = DRILLS[name].run(tmp_path)
    assert result.passed, result.observed
    assert result.figure, "every drill reports a figure"
