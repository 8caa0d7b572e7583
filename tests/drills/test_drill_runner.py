"""The drill runner's contract: drills.json entries, a crashing drill reported, not fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from drills import base
from drills.base import DrillResult
from drills.runner import run_drills
from fedadapt.cli import app as cli


@pytest.fixture
def fake_drills(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two quick drills in place of the real ones: one passes, one crashes."""
    def good(out: Path) -> DrillResult:
        return DrillResult("good", "", "it held", True, {"seconds_to_notice": 1.5})

    def broken(out: Path) -> DrillResult:
        raise RuntimeError("boom")

    monkeypatch.setattr(base, "DRILLS", {
        "good": base.Drill("good", "it holds", good, "simulation"),
        "broken": base.Drill("broken", "it holds too", broken, "simulation"),
    })
    monkeypatch.setattr("drills.runner.DRILLS", base.DRILLS)
    monkeypatch.setattr("drills.runner.load_drills", lambda: None)


def test_drills_json_has_the_contract_keys(tmp_path: Path, fake_drills: None) -> None:
    """scenario, expected, observed, passed (bool) and figure, for every drill run."""
    results = run_drills([], tmp_path)
    data = json.loads((tmp_path / "drills.json").read_text())
    assert [d["scenario"] for d in data] == ["good", "broken"]
    for entry in data:
        assert {"scenario", "expected", "observed", "passed", "figure"} <= set(entry)
        assert isinstance(entry["passed"], bool)
    assert data[0]["expected"] == "it holds" and data[0]["figure"] == {"seconds_to_notice": 1.5}
    assert not results[1].passed and "RuntimeError: boom" in results[1].observed


def test_unknown_drill_is_an_error(tmp_path: Path, fake_drills: None) -> None:
    """Naming a drill that does not exist says which ones do."""
    with pytest.raises(ValueError, match="known: good, broken"):
        run_drills(["nope"], tmp_path)


def test_drill_command_exits_non_zero_when_a_drill_fails(tmp_path: Path,
                                                          fake_drills: None) -> None:
    """`fedadapt drill` prints the table and fails if any drill failed."""
    result = CliRunner().invoke(cli, ["drill", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "good" in result.output and "broken" in result.output


def test_a_relative_out_folder_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedadapt drill --out drills`: each drill gets an absolute folder (Flower runs elsewhere)."""
    from drills.base import DRILLS, Drill, DrillResult
    from drills.runner import run_drills

    seen: list[Path] = []

    def fake(out: Path) -> DrillResult:
        seen.append(out)
        return DrillResult("fake", "", "ok", True, {})

    monkeypatch.setitem(DRILLS, "fake", Drill("fake", "expected", fake, "simulation"))
    monkeypatch.chdir(tmp_path)
    (result,) = run_drills(["fake"], Path("drills"))
    assert result.passed and seen == [tmp_path / "drills" / "fake"]
    assert (tmp_path / "drills" / "drills.json").is_file()


def test_every_simulation_drill_also_runs_in_process() -> None:
    """Each drill of Flower's simulation engine takes ``engine``; the default tests use it."""
    import inspect

    from drills.runner import load_drills

    load_drills()
    simulated = sorted(n for n, d in base.DRILLS.items() if d.engine == "simulation")
    assert simulated == ["correction-tamper", "dp-budget", "label-noise", "malformed-data",
                         "poisoned-replies", "policy-refusal", "straggler", "unwritable-site"]
    for name in simulated:
        engine = inspect.signature(base.DRILLS[name].run).parameters["engine"]
        assert engine.default == "simulation", name  # `fedadapt drill` runs Flower's engine
