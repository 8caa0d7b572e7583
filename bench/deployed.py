"""The same run deployed (TLS, real processes) and simulated: wall time, rounds, same metrics.

The ``deploy`` part of ``fedadapt bench`` (docs/benchmarks.md). Both runs use the default
settings on the same generated sites. The deployed sites get a policy that does not require
differential privacy (a deployed site's default does): their metrics then reach the report, and
the two runs' metrics can be compared; they should be equal up to rounding.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from deploy.local import deploy_local
from shared.settings import RunSettings
from simulations.datasets import sites_for_run
from simulations.simulate import simulate

METRICS = ("auc", "accuracy", "brier", "log_loss")
METHODS = ("local", "source", "adapted")


def deploy_vs_simulation(out: Path, sites: int = 4) -> dict[str, Any]:
    """Run ``deploy-local`` and ``simulate`` on ``sites`` generated hospitals; compare them.

    Returns
    -------
    dict
        Wall and training seconds of both, the deployed rounds' latencies (median, min, max)
        against the simulated mean, and the largest difference between their held-out
        metrics (``None`` if no site has metrics in both).
    """
    settings = RunSettings()
    policy = out / "deploy-policy.toml"
    out.mkdir(parents=True, exist_ok=True)
    policy.write_text("# comparable with the simulation: metrics are not withheld\n"
                      "require-dp = false\n", encoding="utf-8")
    t0 = time.monotonic()
    deployed = deploy_local(sites_for_run("synthetic", out / "deploy", sites, settings),
                            out / "deploy", settings, data="synthetic", site_policy=policy,
                            site_exec=False)
    deploy_wall = time.monotonic() - t0
    t0 = time.monotonic()
    simulated = simulate("synthetic", out / "simulate", settings, n_sites=sites)
    sim_wall = time.monotonic() - t0
    latencies = deployed["deployment"]["round_latency_s"]
    rounds = len(latencies) + 1
    return {
        "sites": sites, "rounds": rounds,
        "deploy_wall_s": deploy_wall, "simulation_wall_s": sim_wall,
        "deploy_train_s": deployed["timing_s"]["train"],
        "simulation_train_s": simulated["timing_s"]["train"],
        "deploy_round_latency_s": {
            "median": float(sorted(latencies)[len(latencies) // 2]) if latencies else None,
            "min": min(latencies, default=None), "max": max(latencies, default=None)},
        "simulation_round_latency_s": simulated["timing_s"]["train"] / rounds,
        "max_metric_difference": _largest_difference(deployed, simulated),
    }


def _metric(report: dict[str, Any], site: str, method: str, name: str) -> float | None:
    value = ((report["sites"].get(site, {}).get("metrics") or {}).get(method) or {}).get(name)
    return float(value) if isinstance(value, int | float) else None


def _largest_difference(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """The largest absolute difference of a held-out metric between two reports' sites."""
    diffs = []
    for site in set(a["sites"]) & set(b["sites"]):
        for method in METHODS:
            for name in METRICS:
                x, y = _metric(a, site, method, name), _metric(b, site, method, name)
                if x is not None and y is not None:
                    diffs.append(abs(x - y))
    return max(diffs, default=None)
