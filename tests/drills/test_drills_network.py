"""The network-namespace drill: a site's link cut in training is a dropout; skipped without root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deploy import netns
from drills.base import DRILLS
from drills.runner import load_drills
from fedadapt.cli import app as cli

load_drills()


@pytest.mark.slow
@pytest.mark.full
@pytest.mark.timeout(900)
def test_netns_dropout_drill(tmp_path: Path, no_leftovers: None) -> None:
    """Three sites in their own namespaces, one cut off: lost, the others finish, nothing left."""
    problem = netns.netns_problem()
    if problem is not None:
        pytest.skip(problem)
    result = DRILLS["netns-dropout"].run(tmp_path)
    assert result.passed, result.observed
    assert not result.skipped
    assert result.figure["sites_in_own_namespace"] == 3
    assert result.figure["rounds_missed_by_lost_site"] == 3
    assert result.figure["left_after_cleanup"] == 0
    assert result.figure["processes_left_in_namespaces"] == 0
    assert netns.leftovers(f"fa-{os.getpid()}-") == []


def test_without_ip_the_drill_is_skipped_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No `ip` command: the drill says why it cannot run, starts nothing, and does not fail."""
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    result = DRILLS["netns-dropout"].run(tmp_path / "drill")
    assert result.skipped == "the `ip` command (iproute2) is not installed"
    assert result.observed.startswith("skipped: ") and not result.passed
    assert not (tmp_path / "drill").exists()


def test_a_namespace_that_cannot_be_made_is_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the privileges, the probe's own error is the reason given."""
    calls: list[tuple[str, ...]] = []

    def refuse(*args: str, check: bool = True) -> str:
        calls.append(args)
        if check:
            raise netns.NetnsError("ip netns add fa-1-probe: Operation not permitted")
        return ""

    monkeypatch.setattr(netns.shutil, "which", lambda name: "/usr/sbin/ip")
    monkeypatch.setattr(netns, "_ip", refuse)
    problem = netns.netns_problem()
    assert problem is not None and "Operation not permitted" in problem
    assert calls[-1][:2] == ("netns", "delete")  # the probe cleans up after itself


def test_a_skipped_drill_does_not_fail_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedadapt drill netns-dropout` where it cannot run: exit 0, "skipped" and the reason."""
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    result = CliRunner().invoke(cli, ["drill", "netns-dropout", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output
    (entry,) = json.loads((tmp_path / "drills.json").read_text())
    assert entry["skipped"] == "the `ip` command (iproute2) is not installed"
    assert entry["passed"] is False and entry["expected"]
