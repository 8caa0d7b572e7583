"""``fedadapt bench``: rounds to the pooled model per strategy, the table, bad options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from client.site import read_manifest
from shared.settings import RunSettings
from simulations.bench import _bytes_per_round
from simulations.bench_plots import bench_rows, plot_bench
from simulations.bench_rounds import rounds_to_pooled
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
