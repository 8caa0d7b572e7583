"""Drills about replies: poisoned updates, one wildly wrong site, a straggler past the timeout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from drills.base import DrillResult, Engine, drill, federation, simulate_with_faults
from shared.settings import RunSettings

POISONS = ("nan", "inf", "wrong-names", "wrong-shape", "negative-count", "absurd-count")
HONEST = ("hospital-a", "hospital-b")


@drill("poisoned-replies",
       "NaN/infinite weights, wrong array names or shapes, a negative or absurd example count: "
       "each rejected and logged with the site's name; no NaN in the aggregate; every round "
       "completes with the others. One site sending weights x -20: trimmed mean keeps the AUC "
       "that plain FedAvg loses", "simulation")
def poisoned_replies(out: Path, engine: Engine = "simulation") -> DrillResult:
    """Six poisoned sites among eight; then a well-formed but wildly wrong site."""
    if out.exists():
        shutil.rmtree(out)
    names = [f"hospital-{c}" for c in "abcdefgh"]
    faults = dict(zip(names[2:], POISONS, strict=True))
    rounds = 3
    report = simulate_with_faults(out / "poison", federation(out / "poison", 8, 42, faults),
                                  RunSettings(num_server_rounds=rounds), engine=engine)
    rejected = {f: [r["round"] for r in report["rounds"] if s in r["rejected"]]
                for s, f in faults.items()}
    log = (out / "poison" / "logs" / "flwr-run.log").read_text(errors="replace")
    named = sum(f"reply of site {s} rejected" in log for s in faults)
    losses = [r["loss"] for r in report["rounds"]]
    finite = all(v is not None and math.isfinite(v) for v in losses) and all(
        report["sites"][h]["metrics"]["source"]["log_loss"] is not None for h in HONEST)
    every_round = all(len(v) == rounds for v in rejected.values())

    aucs = {}
    for label, strategy, fault in (("clean", "fedavg", None), ("fedavg", "fedavg", "scaled:-20"),
                                   ("trimmed", "fedtrimmedavg", "scaled:-20")):
        run = out / f"scaled-{label}"
        faults_scaled = {"hospital-d": fault} if fault else {}
        r = simulate_with_faults(run, federation(run, 4, 42, faults_scaled),
                                 RunSettings(num_server_rounds=10, strategy=strategy),
                                 engine=engine)
        aucs[label] = sum(r["sites"][n]["metrics"]["source"]["auc"]
                          for n in ("hospital-a", "hospital-b", "hospital-c")) / 3
    robust = aucs["trimmed"] > aucs["fedavg"] + 0.1 and aucs["trimmed"] > aucs["clean"] - 0.05
    passed = every_round and named == len(faults) and finite and robust
    return DrillResult(
        "poisoned-replies", "",
        f"{sum(len(v) for v in rejected.values())}/{len(faults) * rounds} poisoned replies "
        f"rejected ({named}/{len(faults)} sites named in the log); losses finite: {finite}; "
        f"honest sites' source AUC with one site x -20: FedAvg {aucs['fedavg']:.3f}, trimmed "
        f"mean {aucs['trimmed']:.3f} (clean FedAvg {aucs['clean']:.3f})",
        passed,
        {"poisoned_rejected": sum(len(v) for v in rejected.values()),
         "poisoned_sent": len(faults) * rounds, "sites_named_in_log": named,
         "auc_clean": round(aucs["clean"], 4), "auc_fedavg_attacked": round(aucs["fedavg"], 4),
         "auc_trimmed_attacked": round(aucs["trimmed"], 4)},
        {"rejected_rounds": rejected},
    )


@drill("straggler",
       "a site slower than the round timeout: the round closes on time; its late reply is never "
       "mixed into a later round; the site sits out training and is reported lost in round 2",
       "simulation")
def straggler(out: Path, engine: Engine = "simulation") -> DrillResult:
    """hospital-c sleeps 25 s in round 2; a training round's reply timeout is 10 s.

    The timeout applies to training rounds only: the stats phase (reading files, starting
    the engine's workers) may take longer on a busy machine and has its own. In-process
    (``engine="in-process"``) the straggler sleeps in its own thread, as it would in its own
    process: the round's reply timeout is real time there too.
    """
    if out.exists():
        shutil.rmtree(out)
    timeout, sleep = 10.0, 25.0
    manifest = federation(out, 4, 42, {"hospital-c": f"slow:2:{sleep:g}"})
    report = simulate_with_faults(out, manifest, RunSettings(
        num_server_rounds=4, reply_timeout=timeout, record_replies=True,
        strategy="fedavg"),  # every round runs (Newton may stop early when converged)
        engine=engine)
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines() if x]
    times = {e["round"]: e["t"] for e in events if e.get("event") == "round"}
    starts = [e["t"] for e in events if e.get("event") == "phase" and e.get("phase") == "train"]
    round2 = times[2] - times[1]
    replies = [json.loads(x) for x in (out / "replies.jsonl").read_text().splitlines() if x]
    train = [r for r in replies if r["type"] == "train"]
    mixed = [r for r in train if r["reply_to"] not in r["sent"]]
    straggler_node = next(r["node"] for r in replies if r["type"] == "query.stats"
                          and r["configs"]["site"]["site-name"] == "hospital-c")
    late = [r["round"] for r in train if r["node"] == straggler_node and r["round"] > 1]
    site = report["sites"]["hospital-c"]
    # Round 2 closed before the straggler's reply was due: it was not waited for (how much
    # sooner depends on the machine's load: the timeout counts from the others' last reply).
    passed = (timeout <= round2 < sleep and not mixed and not late
              and [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
              and [lost["round"] for lost in site.get("lost", [])] == [2])
    return DrillResult(
        "straggler", "",
        f"round 2 closed after {round2:.1f} s (timeout {timeout:g} s, straggler {sleep:g} s); "
        f"train replies from another round's exchange: {len(mixed)}; straggler replies after "
        f"round 1: {len(late)}; hospital-c lost in round(s) "
        f"{[lost['round'] for lost in site.get('lost', [])]}, then {site['status']} for adapt "
        "and evaluate",
        passed,
        {"round2_s": round(round2, 1), "reply_timeout_s": timeout, "mixed_replies": len(mixed),
         "late_replies_used": len(late)},
        {"train_started_at": starts},
    )

