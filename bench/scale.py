"""fedadapt beside the bare Flower app: the same nodes and rounds, started the same way.

Each measurement runs ``fedadapt simulate`` (or ``deploy-local``) as a user would, as a
command, with the peak memory of its whole process tree sampled, then the bare Flower app
(``bench.bare``) at the same number of nodes and rounds: Flower's own floor on this
machine. Rounds are those fedadapt actually ran (Newton stops when converged), so the bare
app is never given more work than fedadapt did.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.bare import run_bare_deployed, run_bare_simulation
from bench.memory import measure_command

N_INPUTS = 7  # the synthetic schema's model inputs (the source model has 8 weights)


def _fedadapt(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedadapt", *args]


def _events(out: Path) -> list[dict[str, Any]]:
    path = out / "events.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _round_times(out: Path) -> list[float]:
    """Seconds of each training round, from the ServerApp's progress events."""
    events = _events(out)
    start = next((e["t"] for e in events if e.get("event") == "phase"
                  and e.get("phase") == "train"), None)
    ends = [e["t"] for e in events if e.get("event") == "round"]
    if start is None or not ends:
        return []
    return [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]


def fedadapt_run(args: list[str], out: Path, timeout: float) -> dict[str, Any]:
    """Run a fedadapt command writing to ``out``; wall, peak memory, rounds, lost sites."""
    if out.exists():
        shutil.rmtree(out)
    peak = measure_command(_fedadapt(*args, "--out", str(out)), timeout=timeout,
                           log_path=out.parent / f"{out.name}.log")
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    rounds = _round_times(out)
    sites = report.get("sites", {})
    return {
        "ok": peak.returncode == 0 and bool(report), "returncode": peak.returncode,
        "timed_out": peak.timed_out, "wall_s": peak.wall_s, "peak_rss_gib": peak.peak_rss_gib,
        "rounds": len(rounds), "round_s": statistics.median(rounds) if rounds else None,
        "first_round_s": rounds[0] if rounds else None,
        "phases_s": report.get("timing_s"),
        "sites": len(sites),
        "lost_sites": sum(1 for s in sites.values() if s.get("lost")),
        "failed_sites": sum(1 for s in sites.values() if s.get("status") != "ok"),
    }


def simulate_vs_bare(n_sites: int, rounds: int, work: Path, timeout: float = 3600.0,
                     extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """``fedadapt simulate`` on ``n_sites`` generated hospitals against the bare app.

    Returns
    -------
    dict
        ``wall_s``, ``round_s``, ``peak_rss_gib``, ``lost_sites`` of fedadapt, the bare app's
        ``bare_wall_s``, ``bare_round_s``, ``bare_peak_rss_gib`` and ``vs_bare`` (wall ratio).
    """
    ours = fedadapt_run(["simulate", "--sites", str(n_sites), "--rounds", str(rounds),
                         *extra], work / f"fedadapt-{n_sites}", timeout)
    bare = run_bare_simulation(n_sites, max(1, ours["rounds"] or rounds), N_INPUTS,
                               work / f"bare-{n_sites}")
    return {**ours, "bare_wall_s": bare["wall_s"], "bare_round_s":
            bare.get("later_round_median_s"), "bare_peak_rss_gib": bare.get("peak_rss_gib"),
            "bare_rounds": bare.get("rounds"),
            "vs_bare": ours["wall_s"] / bare["wall_s"] if bare.get("wall_s") else None}


def deploy_vs_bare(n_sites: int, rounds: int, work: Path, timeout: float = 3600.0,
                   ) -> dict[str, Any]:
    """``fedadapt deploy-local`` (TLS, authenticated SuperNodes) against the bare deployed app."""
    ours = fedadapt_run(["deploy-local", "--sites", str(n_sites), "--rounds", str(rounds)],
                        work / f"deploy-{n_sites}", timeout)
    bare = run_bare_deployed(n_sites, max(1, ours["rounds"] or rounds), N_INPUTS,
                             work / f"bare-deploy-{n_sites}")
    return {**ours, "bare_wall_s": bare["wall_s"], "bare_round_s":
            bare.get("later_round_median_s"), "bare_peak_rss_gib": bare.get("peak_rss_gib"),
            "vs_bare": ours["wall_s"] / bare["wall_s"] if bare.get("wall_s") else None}
