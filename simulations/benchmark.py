"""Measure the core targets: default run time, best-of-both on heart and generated data, FLamby.

Run ``python -m simulations.benchmark --out bench-out [--heart DIR] [--deploy]``. It prints and
writes ``bench-out/benchmark.json``. Numbers come from the same code path as ``fedadapt
simulate``; nothing is tuned on held-out rows here.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.report import to_jsonable
from shared.settings import RunSettings
from simulations.simulate import simulate

log = logging.getLogger(__name__)

FLAMBY_BEST_PUBLISHED = 0.81  # FENDA-FL / PerFCL on Fed-Heart-Disease (average accuracy)
FLAMBY_MAJORITY = 0.721


def default_run(out: Path) -> dict[str, Any]:
    """The README's main job: the eight generated hospitals, default settings."""
    t0 = time.monotonic()
    report = simulate("synthetic", out / "default", RunSettings())
    wall = time.monotonic() - t0
    return {"wall_s": wall, "flower_s": report["timing_s"]["total"], "target_s": 60.0,
            "passed": wall < 60.0,
            "federated_vs_pooled": report["summary"].get("federated_vs_pooled")}


def _rule(report: dict[str, Any], tolerance: float = 0.01) -> dict[str, Any]:
    """Per site: adapted mean AUC against max(local, source) (the issue's rule)."""
    sites: dict[str, Any] = {}
    for name, site in report["sites"].items():
        m = site.get("metrics") or {}
        aucs = {k: (m.get(k) or {}).get("auc") for k in ("local", "source", "adapted",
                                                          "pooled", "oracle")}
        if aucs["adapted"] is None or aucs["local"] is None or aucs["source"] is None:
            sites[name] = {**aucs, "judged": False}
            continue
        best_other = max(aucs["local"], aucs["source"])
        sites[name] = {
            **aucs, "judged": True, "n": site["n_train"] + site["n_test"],
            "adapted_minus_best_other": aucs["adapted"] - best_other,
            "within_tolerance": aucs["adapted"] >= best_other - tolerance,
            "above_both": aucs["adapted"] > best_other,
            "choices": site.get("model", {}).get("choices"),
        }
    judged = [s for s in sites.values() if s["judged"]]
    return {"sites": sites, "every_site_within_0.01": all(s["within_tolerance"] for s in judged),
            "sites_above_both": sum(s["above_both"] for s in judged)}


def heart_repeats(out: Path, heart: Path, repeats: int) -> dict[str, Any]:
    """Heart, K splits: adapted >= max(local, source) - 0.01 everywhere, above both at >= 2."""
    report = simulate(f"heart:{heart}", out / "heart", RunSettings(repeats=repeats))
    rule = _rule(report)
    fvp = report["summary"]["federated_vs_pooled"]
    return {"repeats": repeats, **rule,
            "passed": rule["every_site_within_0.01"] and rule["sites_above_both"] >= 2,
            "federated_vs_pooled": fvp, "wall_s": report["timing_s"]["total"]}


def generated_repeats(out: Path, repeats: int) -> dict[str, Any]:
    """Generated default world, K splits: the rule, and <= 0.02 from the best achievable.

    The second target applies to the sites with at least 200 rows.
    """
    report = simulate("synthetic", out / "generated", RunSettings(repeats=repeats))
    rule = _rule(report)
    large = {n: s for n, s in rule["sites"].items() if s["judged"] and s["n"] >= 200}
    gaps = {n: s["oracle"] - s["adapted"] for n, s in large.items() if s["oracle"] is not None}
    return {"repeats": repeats, **rule, "large_site_gap_to_best": gaps,
            "large_sites_within_0.02": all(g <= 0.02 for g in gaps.values()),
            "passed": rule["every_site_within_0.01"] and all(g <= 0.02 for g in gaps.values()),
            "wall_s": report["timing_s"]["total"]}


def flamby(out: Path, heart: Path) -> dict[str, Any]:
    """FLamby's rows and split: mean test accuracy (and AUC) over the four centres."""
    report = simulate(f"heart:{heart}", out / "flamby", RunSettings(protocol="flamby"))
    methods = report["summary"]["methods"]
    sites = report["sites"].values()
    # FLamby's figure is the plain mean over the four centres (Switzerland's 16 test patients
    # included), not the report's mean over the sites that can judge.
    accuracy = {m: float(np.mean([s["metrics"][m]["accuracy"] for s in sites]))
                for m in methods}
    aucs = {m: [s["metrics"][m]["auc"] for s in sites if s["metrics"][m]["auc"] is not None]
            for m in methods}
    return {
        "mean_accuracy": accuracy,
        "mean_auc": {m: float(np.mean(v)) if v else None for m, v in aucs.items()},
        "per_centre_accuracy": {n: {m: s["metrics"][m]["accuracy"] for m in s["metrics"]}
                                for n, s in report["sites"].items()},
        "per_centre_auc": {n: {m: s["metrics"][m]["auc"] for m in s["metrics"]}
                           for n, s in report["sites"].items()},
        "choices": {n: s.get("model", {}).get("choice") for n, s in report["sites"].items()},
        "majority_accuracy": report["summary"]["majority_accuracy_all_sites"],
        "best_published": FLAMBY_BEST_PUBLISHED,
        "target": 0.85,
        "passed": accuracy["adapted"] >= 0.85,
        "federated_vs_pooled": report["summary"]["federated_vs_pooled"],
    }


def deploy_vs_simulation(out: Path, sites: int = 4) -> dict[str, Any]:
    """The same run deployed over TLS (real processes) and in simulation: wall time, rounds."""
    from simulations.deploy import deploy_local

    t0 = time.monotonic()
    deployed = deploy_local("synthetic", out / "deploy", RunSettings(), n_sites=sites)
    deploy_wall = time.monotonic() - t0
    t0 = time.monotonic()
    simulated = simulate("synthetic", out / "simulate", RunSettings(), n_sites=sites)
    sim_wall = time.monotonic() - t0
    rounds = RunSettings().num_server_rounds
    latencies = deployed["deployment"]["round_latency_s"]
    diff = max(
        abs(deployed["sites"][n]["metrics"][m][k] - simulated["sites"][n]["metrics"][m][k])
        for n in simulated["sites"] for m in ("local", "source", "adapted")
        for k in ("auc", "accuracy", "brier", "log_loss")
    )
    return {
        "sites": sites, "rounds": rounds,
        "deploy_wall_s": deploy_wall, "simulation_wall_s": sim_wall,
        "deploy_train_s": deployed["timing_s"]["train"],
        "simulation_train_s": simulated["timing_s"]["train"],
        "deploy_round_latency_s": {"median": float(sorted(latencies)[len(latencies) // 2]),
                                   "min": min(latencies), "max": max(latencies)},
        "simulation_round_latency_s": simulated["timing_s"]["train"] / rounds,
        "max_metric_difference": diff,
    }


def _print_rule(title: str, result: dict[str, Any]) -> None:
    print(f"{title}: mean AUC local / source / adapted (adapted - max(local, source))")
    for name, s in result["sites"].items():
        if not s["judged"]:
            print(f"  {name:12s} AUC undefined")
            continue
        print(f"  {name:12s} {s['local']:.4f} / {s['source']:.4f} / {s['adapted']:.4f} "
              f"({s['adapted_minus_best_other']:+.4f})")
    print(f"  every site within 0.01: {result['every_site_within_0.01']}; above both at "
          f"{result['sites_above_both']} site(s)")


def main() -> None:
    """Run the benchmarks named on the command line and write benchmark.json."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--heart", type=Path, default=None,
                        help="folder with the UCI processed.*.data files")
    parser.add_argument("--repeats", type=int, default=20, help="splits on the heart data")
    parser.add_argument("--generated-repeats", type=int, default=10,
                        help="splits on the generated world")
    parser.add_argument("--deploy", action="store_true",
                        help="also time deploy-local --sites 4 against the same simulation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("client").setLevel(logging.ERROR)
    results: dict[str, Any] = {"default": default_run(args.out)}
    print(f"default simulate: {results['default']['wall_s']:.1f} s wall "
          f"(target < 60 s: {'pass' if results['default']['passed'] else 'FAIL'})")
    results["generated"] = gen = generated_repeats(args.out, args.generated_repeats)
    _print_rule(f"generated world, {args.generated_repeats} splits", gen)
    print("  gap to the best achievable (sites >= 200 rows): " + ", ".join(
        f"{n} {g:+.4f}" for n, g in gen["large_site_gap_to_best"].items())
        + f" (target <= 0.02: {'pass' if gen['large_sites_within_0.02'] else 'FAIL'})")
    if args.heart is not None:
        results["heart"] = heart = heart_repeats(args.out, args.heart, args.repeats)
        _print_rule(f"heart, {args.repeats} splits", heart)
        print(f"  federated - pooled log-loss: "
              f"{heart['federated_vs_pooled']['difference']:+.4f}")
        results["flamby"] = fl = flamby(args.out, args.heart)
        print("flamby protocol, mean test accuracy: " + ", ".join(
            f"{m} {v:.3f}" for m, v in fl["mean_accuracy"].items())
            + "; mean AUC: " + ", ".join(
            f"{m} {v:.3f}" for m, v in fl["mean_auc"].items() if v is not None)
            + f"; majority label {fl['majority_accuracy']:.3f}; "
            f"target 0.85: {'pass' if fl['passed'] else 'FAIL'}")
    if args.deploy:
        results["deploy"] = dep = deploy_vs_simulation(args.out)
        median = dep["deploy_round_latency_s"]["median"]
        print(f"deploy-local --sites 4: {dep['deploy_wall_s']:.1f} s wall vs simulation "
              f"{dep['simulation_wall_s']:.1f} s; per round {median:.2f} s vs "
              f"{dep['simulation_round_latency_s']:.2f} s; largest metric difference "
              f"{dep['max_metric_difference']:.1e}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "benchmark.json"
    path.write_text(json.dumps(to_jsonable(results), indent=2, allow_nan=False))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
