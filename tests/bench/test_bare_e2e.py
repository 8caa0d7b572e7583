"""The bare Flower app in Flower's simulation engine, started as `fedadapt simulate` starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.bare import RESULT_FILE, run_bare_simulation

pytestmark = [pytest.mark.slow, pytest.mark.full, pytest.mark.timeout(600)]


def test_bare_simulation_returns_sensible_numbers(tmp_path: Path, no_leftovers: None) -> None:
    result = run_bare_simulation(3, 2, 20, tmp_path, timeout=480)
    assert result["mode"] == "simulation"
    assert (result["nodes"], result["rounds"], result["n_inputs"]) == (3, 2, 20)
    assert len(result["round_s"]) == 2 and all(s > 0 for s in result["round_s"])
    assert result["first_round_s"] == result["round_s"][0]
    assert 0 < result["train_s"] <= result["serverapp_s"] < result["run_s"] < result["wall_s"]
    assert result["startup_s"] > 0 and result["stop_s"] >= 0
    # SuperLink, SuperExec, the simulation process, ray and its actors: more than one process,
    # more than a few MB, less than the machine.
    assert result["peak_processes"] >= 4
    assert 0.1 < result["peak_rss_gib"] < 16
    assert 0 < result["final_train_loss"] < math.log(2)
    written = json.loads((tmp_path / RESULT_FILE).read_text())
    assert written["finished"] and written["nodes"] == 3
    assert (tmp_path / "logs" / "superlink.log").exists()
    assert Path(result["run_log"]).read_text().count("[ROUND") == 2
