"""Measure the core targets: wall time of the default run, do-no-harm on heart, FLamby accuracy.

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

from server.report import to_jsonable
from shared.settings import RunSettings
from simulations.simulate import simulate

log = logging.getLogger(__name__)

FLAMBY_BEST_PUBLISHED = 0.81  # FENDA-FL / PerFCL on Fed-Heart-Disease (average accuracy)
FLAMBY_MAJORITY = 0.721


def default_run(out: Path) -> dict[str, Any]:
    """The README's main job: four generated hospitals, default settings."""
    t0 = time.monotonic()
    report = simulate("synthetic", out / "default", RunSettings())
    wall = time.monotonic() - t0
    return {"wall_s": wall, "flower_s": report["timing_s"]["total"], "target_s": 60.0,
            "passed": wall < 60.0,
            "federated_vs_pooled": report["summary"].get("federated_vs_pooled")}


def heart_repeats(out: Path, heart: Path, repeats: int) -> dict[str, Any]:
    """Do-no-harm: adapted mean AUC >= source at every centre, > at Cleveland."""
    report = simulate(f"heart:{heart}", out / "heart", RunSettings(repeats=repeats))
    centres = {}
    for name, site in report["sites"].items():
        m = site["metrics"]
        centres[name] = {
            "source_auc": m["source"]["auc"], "adapted_auc": m["adapted"]["auc"],
            "local_auc": m["local"]["auc"], "pooled_auc": m["pooled"]["auc"],
            "source_auc_sd": m["source"]["auc_sd"], "adapted_auc_sd": m["adapted"]["auc_sd"],
            "applied_fraction": site["correction"]["applied_fraction"],
        }
    ok = all(c["adapted_auc"] >= c["source_auc"] for c in centres.values()) and (
        centres["cleveland"]["adapted_auc"] > centres["cleveland"]["source_auc"]
    )
    fvp = report["summary"]["federated_vs_pooled"]
    return {"repeats": repeats, "centres": centres, "do_no_harm_passed": ok,
            "federated_vs_pooled": fvp,
            "log_loss_within_0.01": abs(fvp["difference"]) <= 0.01,
            "wall_s": report["timing_s"]["total"]}


def flamby(out: Path, heart: Path) -> dict[str, Any]:
    """FLamby's rows and split: mean test accuracy over the four centres."""
    report = simulate(f"heart:{heart}", out / "flamby", RunSettings(protocol="flamby"))
    methods = report["summary"]["methods"]
    accuracy = {m: v["mean_accuracy"] for m, v in methods.items()}
    return {
        "mean_accuracy": accuracy,
        "per_centre_accuracy": {n: {m: s["metrics"][m]["accuracy"] for m in s["metrics"]}
                                for n, s in report["sites"].items()},
        "majority_accuracy": report["summary"]["majority_accuracy"],
        "best_published": FLAMBY_BEST_PUBLISHED,
        "target": 0.83,
        "passed": accuracy["adapted"] >= 0.83,
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


def main() -> None:
    """Run the benchmarks named on the command line and write benchmark.json."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--heart", type=Path, default=None,
                        help="folder with the UCI processed.*.data files")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--deploy", action="store_true",
                        help="also time deploy-local --sites 4 against the same simulation")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("client").setLevel(logging.ERROR)
    results: dict[str, Any] = {"default": default_run(args.out)}
    print(f"default simulate: {results['default']['wall_s']:.1f} s wall "
          f"(target < 60 s: {'pass' if results['default']['passed'] else 'FAIL'})")
    if args.heart is not None:
        results["heart"] = heart_repeats(args.out, args.heart, args.repeats)
        print(f"heart, {args.repeats} repeats (mean AUC source -> adapted):")
        for name, c in results["heart"]["centres"].items():
            print(f"  {name:12s} {c['source_auc']:.4f} -> {c['adapted_auc']:.4f}")
        print(f"  do-no-harm: {'pass' if results['heart']['do_no_harm_passed'] else 'FAIL'}; "
              f"log-loss federated - pooled: "
              f"{results['heart']['federated_vs_pooled']['difference']:+.4f}")
        results["flamby"] = flamby(args.out, args.heart)
        acc = results["flamby"]["mean_accuracy"]
        print("flamby protocol, mean test accuracy: " + ", ".join(
            f"{m} {v:.3f}" for m, v in acc.items())
            + f"; majority label {results['flamby']['majority_accuracy']:.3f}; "
            f"target 0.83: {'pass' if results['flamby']['passed'] else 'FAIL'}")
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
