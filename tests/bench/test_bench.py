"""``fedadapt bench``: its parts and options, rounds to the pooled model, the table."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.options import DEFAULT_PARTS, PARTS, BenchOptions
from bench.plots import bench_rows, plot_bench
from bench.rounds import rounds_to_pooled
from bench.run import _bytes_per_round, run_bench
from client.site import read_manifest
from shared.settings import RunSettings
from simulations.generator import generate


def test_rounds_to_pooled_counts_rounds_per_strategy(tmp_path: Path) -> None:
    """Every strategy's log-loss per round; Newton is within 0.005 of pooled in a few rounds."""
    manifest = read_manifest(generate(tmp_path / "data", n_sites=3, seed=3))
    result = rounds_to_pooled(manifest, tmp_path / "runs", RunSettings(), max_rounds=6)
    assert set(result["strategies"]) == {"fedavg", "fedprox", "newton"}
    for r in result["strategies"].values():
        assert len(r["log_loss"]) == 6
        if r["rounds"] is not None:
            assert r["log_loss"][r["rounds"] - 1] <= result["pooled_log_loss"] + 0.005
            assert all(v > result["pooled_log_loss"] + 0.005
                       for v in r["log_loss"][:r["rounds"] - 1])
    newton = result["strategies"]["newton"]
    assert newton["rounds"] is not None and newton["rounds"] <= 5
    assert abs(newton["final_gap"]) < 1e-4  # converged: the pooled optimum itself
    paths = plot_bench({"rounds_detail": {"generated": result}}, tmp_path / "plots")
    assert Path(paths[0]).read_bytes()[:4] == b"\x89PNG"


def test_bytes_per_round_reads_the_reply_log(tmp_path: Path) -> None:
    """The median size of the training replies, against the model's 8 float64 weights."""
    lines = [{"type": "train", "bytes": b} for b in (1800, 1810, 1820)]
    lines.append({"type": "query.stats", "bytes": 99999})
    (tmp_path / "replies.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    b = _bytes_per_round(tmp_path)
    assert (b["site_bytes"], b["model_bytes"], b["replies"]) == (1810, 64, 3)
    assert b["within_limit"] is True


def test_table_rows_fit_100_columns() -> None:
    """Each row of the printed table is short enough for a 100-column terminal."""
    bench = {
        "targets": {"newton_rounds": 5, "simulate_vs_bare": 1.3, "scale_wall_s": 300.0,
                    "scale_gib": 4.0, "fit_s": 20.0, "fit_gib": 2.0},
        "rounds_to_pooled": {"heart": {"fedavg": 12, "fedprox": None, "newton": 2}},
        "scale": {"1000": {"rounds": 10, "wall_s": 290.0, "round_s": 9.1, "peak_rss_gib": 2.1,
                           "lost_sites": 0, "bare_wall_s": 166.0, "vs_bare": 1.75}},
        "correction_fit": {"1000000": {"seconds": 14.2, "peak_gib": 1.4}},
        "bytes_per_round": {"site_bytes": 1810, "model_bytes": 64, "ratio": 28.3,
                            "limit_bytes": 4166.4},
    }
    rows = bench_rows(bench)
    assert rows[0] == ("rounds to pooled, heart", "fedavg 12, fedprox never, newton 2",
                       "newton <= 5")
    assert all(sum(len(c) for c in row) + 10 <= 100 for row in rows)


def test_unknown_part_is_one_clear_line(tmp_path: Path) -> None:
    """A mistyped part is refused before anything runs, without a traceback."""
    result = subprocess.run([sys.executable, "-m", "fedadapt", "bench", "--parts", "speed",
                             "--out", str(tmp_path / "b")], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode != 0
    assert "unknown part(s) speed" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "b").exists()


def _fedadapt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedadapt", *args], capture_output=True,
                          text=True, timeout=120, check=False)


def test_every_part_is_known_and_the_defaults_run_the_first_five() -> None:
    """The parts the command lists, and what runs when none is named."""
    assert set(DEFAULT_PARTS) == {"rounds", "overhead", "scale", "site", "bytes"}
    assert set(PARTS) >= set(DEFAULT_PARTS) | {"choice", "deploy", "privacy", "nonlinear",
                                                 "bare"}
    assert BenchOptions().problems() == []
    assert BenchOptions(fit_rows=(20_000, 3_000_000)).sizes("predict") == (100_000,)
    assert BenchOptions(fit_rows=(5_000,)).sizes("predict") == (5_000,)
    assert BenchOptions(predict_rows=(300, 400)).sizes("predict") == (300, 400)


@pytest.mark.parametrize(("options", "expected"), [
    (BenchOptions(parts=("speed",)), "unknown part(s) speed"),
    (BenchOptions(scale_sites=(1,)), "--scale-sites needs at least 2"),
    (BenchOptions(fit_rows=(50,)), "at least 100 rows"),
    (BenchOptions(site_measures=("fit", "fast")), "--site-measures takes fit, local, predict"),
    (BenchOptions(epsilons=(3.0, 0.0)), "every epsilon must be positive"),
    (BenchOptions(splits=0), "--*splits must be at least 1"),
    (BenchOptions(bare_gateway=True), "add --bare-deployed"),
])
def test_options_that_cannot_run_are_named(options: BenchOptions, expected: str) -> None:
    assert any(expected in p for p in options.problems()), options.problems()


def test_a_bad_number_or_a_setting_without_its_part_is_one_clear_line(tmp_path: Path) -> None:
    """Run settings are the privacy part's: given without it, they are refused at once."""
    for args, expected in (
        (["--parts", "scale", "--scale-sites", "10,ten"], "--scale-sites '10,ten'"),
        (["--parts", "rounds", "--strategy", "fedavg"], "run settings (--strategy) apply to "
         "the privacy part's runs"),
        (["--parts", "bare", "--bare-gateway"], "add --bare-deployed"),
    ):
        result = _fedadapt("bench", *args, "--out", str(tmp_path / "b"))
        assert result.returncode == 1, result.stdout
        assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(importlib.util.find_spec("lightgbm") is not None,
                    reason="LightGBM is installed here")
def test_the_nonlinear_part_says_how_to_install_lightgbm(tmp_path: Path) -> None:
    """Without the bench extra: one line saying how to get it, before anything runs."""
    result = _fedadapt("bench", "--parts", "rounds,nonlinear", "--out", str(tmp_path / "b"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install -e ".[bench]"' in lines[0], result.stderr
    assert not (tmp_path / "b").exists()


def test_the_privacy_part_writes_its_table_and_plot(tmp_path: Path) -> None:
    """One split, one epsilon, two rounds, in-process: bench.json, privacy.md, the plot."""
    settings = RunSettings(num_server_rounds=2, cv_folds=2)
    options = BenchOptions(parts=("privacy",), splits=1, epsilons=(3.0,), settings=settings)
    said: list[str] = []
    result = run_bench(tmp_path / "b", options, say=said.append)
    levels = result["privacy"]["levels"]
    assert set(levels) == {"none", "3"} and result["privacy"]["splits"] == 1
    assert any(site["epsilon_mean"] for site in levels["3"]["sites"].values())
    assert "| site | figure | no DP | eps 3 |" in (tmp_path / "b" / "privacy.md").read_text()
    assert any(p.endswith("privacy.png") for p in result["plots"])
    stored = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert stored["parts"] == ["privacy"] and "privacy" in stored
    assert said[0].startswith("utility against privacy: synthetic, 1 splits")
    assert any(row[0] == "utility against privacy, 1 splits" for row in bench_rows(result))
