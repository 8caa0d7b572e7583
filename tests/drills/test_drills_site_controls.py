"""Drills on a site's own controls (policy, privacy budget), run in Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from drills.base import DRILLS, DrillResult
from drills.runner import load_drills

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _run(name: str, out: Path) -> DrillResult:
    load_drills()
    return DRILLS[name].run(out)


def test_policy_refusal(tmp_path: Path, no_leftovers: None) -> None:
    """A site refusing training and a site below min-rows are reported with their rules."""
    result = _run("policy-refusal", tmp_path)
    assert result.passed, result.observed
    assert result.figure["hospital-c"] == [("train", "phases")]
    assert result.figure["hospital-d"] == [("stats", "min-rows")]
    assert result.figure["hospital-a"] == result.figure["hospital-b"] == []


def test_dp_budget(tmp_path: Path, no_leftovers: None) -> None:
    """A site whose privacy budget runs out stops training; the run completes with the others."""
    result = _run("dp-budget", tmp_path)
    assert result.passed, result.observed
    stopped = result.figure["stopped"]
    assert stopped["rule"] == "max-epsilon-total" and stopped["round"] == 2
    spent = result.figure["epsilon"]
    assert 0 < spent[stopped["site"]] < min(v for n, v in spent.items() if n != stopped["site"])
