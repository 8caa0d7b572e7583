"""Drills on a site's own controls (policy, privacy budget), in-process and in Flower's engine."""

from __future__ import annotations

from pathlib import Path

from drills.base import Engine
from drills.policy import policy_refusal
from drills.privacy import dp_budget


def test_policy_refusal(tmp_path: Path, engine: Engine, no_leftovers: None) -> None:
    """A site refusing training and a site below min-rows are reported with their rules."""
    result = policy_refusal(tmp_path, engine=engine)
    assert result.passed, result.observed
    assert result.figure["hospital-c"] == [("train", "phases")]
    assert result.figure["hospital-d"] == [("stats", "min-rows")]
    assert result.figure["hospital-a"] == result.figure["hospital-b"] == []


def test_dp_budget(tmp_path: Path, engine: Engine, no_leftovers: None) -> None:
    """A site whose privacy budget runs out stops training; the run completes with the others."""
    result = dp_budget(tmp_path, engine=engine)
    assert result.passed, result.observed
    stopped = result.figure["stopped"]
    assert stopped["rule"] == "max-epsilon-total" and stopped["round"] == 2
    spent = result.figure["epsilon"]
    assert 0 < spent[stopped["site"]] < min(v for n, v in spent.items() if n != stopped["site"])
