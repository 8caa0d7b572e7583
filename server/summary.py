"""Building ``report.json``'s content from the sites' aggregate replies, over repeated splits."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.assessment import assess
from shared import protocol
from shared.metrics import mean_sd
from shared.protocol import METHODS, METRIC_NAMES


@dataclass
class RepeatResult:
    """What one repeat (one seeded split) of the pipeline produced, per site name.

    Attributes
    ----------
    evaluate : dict
        Phase-4 metrics per site (keys ``"<method>.<metric>"``, ``n-test``, ...).
    adapt : dict
        Phase-3 metrics per site.
    texts : dict
        Per site, its model in words: correction status, chosen model, reason.
    failures : dict
        Error text per site that failed in this repeat (phase: reason).
    lost : dict
        Per site dropped during training: the round, the reason, the rounds it missed.
    rounds : list of dict
        Per round: ``round``, ``loss``, ``global_loss``, ``rejected`` sites.
    converged_round : int or None
        Strategy newton: the round in which it converged (later rounds were not run).
    timing : dict
        Seconds per phase.
    """

    repeat: int
    split_seed: int
    evaluate: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapt: dict[str, dict[str, Any]] = field(default_factory=dict)
    texts: dict[str, dict[str, str]] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    lost: dict[str, dict[str, Any]] = field(default_factory=dict)
    site_features: dict[str, list[str]] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    converged_round: int | None = None  # strategy newton: the round it converged in
    timing: dict[str, float] = field(default_factory=dict)
    source_digest: str = ""
    notes: list[str] = field(default_factory=list)  # for people: e.g. training ended early
    # Per feature group: features, members, rows, rounds, the effects learned (server.groups).
    groups: list[dict[str, Any]] = field(default_factory=list)
    # Secure aggregation: the largest bound on a total's difference from the exact sum, and
    # the largest magnitude of a summed value (against secagg-clip: the headroom left).
    secagg_error_bound: float = 0.0
    secagg_largest: float = 0.0


# How a site's refusal reads (client.egress.error_reply): the rule, then why.
REFUSAL = re.compile(r"refused by policy rule '([A-Za-z0-9_-]+)': ?(.*)", re.S)


def refusals(errors: Sequence[str], lost: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests a site refused by its policy: phase (and round), rule, reason.

    Parameters
    ----------
    errors : sequence of str
        The site's failures, ``"<phase>: <reason>"``.
    lost : sequence of dict
        The site's drops during training (``round``, ``reason``).

    Returns
    -------
    list of dict
        ``phase``, ``round`` (training only, else None), ``rule`` and ``reason``; one per
        distinct refusal.
    """
    found: list[dict[str, Any]] = []
    candidates = [(e.split(":", 1)[0], None, e) for e in errors]
    candidates += [("train", drop.get("round"), str(drop.get("reason", ""))) for drop in lost]
    for phase, rnd, text in candidates:
        m = REFUSAL.search(text)
        if m:
            item = {"phase": phase, "round": rnd, "rule": m.group(1), "reason": m.group(2)}
            if item not in found:
                found.append(item)
    return found


def method_metrics(values: Sequence[dict[str, float]], method: str) -> dict[str, Any]:
    """Mean, sd and count over repeats of one method's metrics at one site."""
    out: dict[str, Any] = {}
    for name in METRIC_NAMES:
        mean, sd, n = mean_sd([v.get(f"{method}.{name}", math.nan) for v in values])
        out[name] = mean
        out[f"{name}_sd"] = sd
        if name == "auc":
            out["auc_n"] = n
    return out


WITHHELD_NOTE = ("fitted its model; its held-out results stay at the site, which answers only "
                 "under differential privacy (`fedadapt site-results` there shows them)")


def site_entry(name: str, results: Sequence[RepeatResult]) -> dict[str, Any]:
    """The report entry of one site: sizes, metrics per method, correction, status."""
    evals = [r.evaluate[name] for r in results if name in r.evaluate]
    adapts = [r.adapt[name] for r in results if name in r.adapt]
    errors = [r.failures[name] for r in results if name in r.failures]
    features = next((r.site_features[name] for r in results if name in r.site_features), [])
    lost = [r.lost[name] for r in results if name in r.lost]
    node = next((r.nodes[name] for r in results if name in r.nodes), None)
    refused = refusals(errors, lost)
    said = {"refused": refused} if refused else {}
    if not evals and lost:
        return {
            "n_train": 0, "n_test": 0, "positives_test": 0, "prevalence_test": None,
            "site_features": features, "status": "refused" if refused else "lost",
            "error": f"lost in round {lost[0]['round']}: {lost[0]['reason']}",
            "lost": lost, "metrics": {}, "node_id": node,
            "correction": {"applied": False, "strength": None, "applied_fraction": 0.0},
            "repeats_failed": len(lost), **said,
        }
    if not evals:
        return {
            "n_train": 0, "n_test": 0, "positives_test": 0, "prevalence_test": None,
            "site_features": features, "status": "refused" if refused else "failed",
            "error": errors[0] if errors else "no evaluation reply", "metrics": {},
            "node_id": node,
            "correction": {"applied": False, "strength": None, "applied_fraction": 0.0},
            "repeats_failed": len(errors), **said,
        }
    if all(v.get(protocol.WITHHELD) == 1.0 for v in evals):
        # The site answers only under differential privacy: its scores stay at the site.
        return {
            "n_train": 0, "n_test": 0, "positives_test": 0, "prevalence_test": None,
            "site_features": features, "status": "withheld",
            "error": WITHHELD_NOTE, "metrics": {}, "node_id": node,
            "correction": {"applied": False, "strength": None, "applied_fraction": 0.0},
            "repeats_failed": len(errors), **({"lost": lost} if lost else {}), **said,
        }
    first = evals[0]
    n_test = int(first["n-test"])
    positives = int(first["positives-test"])
    applied = [v.get("correction-applied", 0.0) == 1.0 for v in evals]
    strengths = [
        v["correction-strength"] for v, a in zip(evals, applied, strict=True) if a
    ]
    fraction = float(np.mean(applied))
    texts = next((r.texts[name] for r in reversed(results) if name in r.texts), {})
    choices = [r.texts[name].get(protocol.MODEL_CHOICE, "") for r in results
               if name in r.texts]
    entry: dict[str, Any] = {
        "n_train": int(first["n-train"]),
        "n_test": n_test,
        "positives_test": positives,
        "prevalence_test": positives / n_test if n_test else None,
        "site_features": features,
        "status": "ok",
        "error": errors[0] if errors else None,
        "metrics": {m: method_metrics(evals, m) for m in METHODS},
        "correction": {
            # With repeats: applied in at least half of them; strength = median when applied.
            "applied": fraction >= 0.5,
            "strength": float(np.median(strengths)) if strengths and fraction >= 0.5 else None,
            "applied_fraction": fraction,
            "fallbacks": int(sum(v.get("correction-fallback", 0.0) for v in evals)),
            "status": texts.get(protocol.CORRECTION_STATUS, ""),
            "cv_log_loss_source": _mean([a.get("cv-log-loss-source") for a in adapts]),
            "cv_log_loss": _mean([a.get("cv-log-loss") for a in adapts]),
        },
        "model": {
            # The model the site uses (the "adapted" column): its choice in the last repeat,
            # how often each model was chosen over the repeats, and why, in words.
            "choice": texts.get(protocol.MODEL_CHOICE, "source"),
            "reason": texts.get(protocol.MODEL_REASON, ""),
            "choices": {c: choices.count(c) for c in dict.fromkeys(choices)},
            "source_weight": _mean([v.get("source-weight") for v in evals]),
            "cv_log_loss": _mean([a.get("cv-log-loss") for a in adapts]),
            "cv_log_loss_source": _mean([a.get("cv-log-loss-source") for a in adapts]),
            "cv_log_loss_local": _mean([a.get("cv-log-loss-local") for a in adapts]),
            "cv_auc": _mean([a.get("cv-auc") for a in adapts]),
            "cv_auc_source": _mean([a.get("cv-auc-source") for a in adapts]),
            "cv_auc_local": _mean([a.get("cv-auc-local") for a in adapts]),
        },
        "reliability": {m: _reliability(evals, m) for m in METHODS},
        "repeats_failed": len(errors),
        "node_id": node,
        # Lost during training (missed rounds) but back for the correction and evaluation.
        **({"lost": lost} if lost else {}),
        # Requests the site refused by its policy (e.g. training rounds beyond its budget).
        **said,
    }
    entry["assessment"] = assess(entry, evals)
    return entry


def _reliability(evals: Sequence[dict[str, Any]], method: str) -> dict[str, list[float]]:
    """The reliability curve, averaged bin by bin over the repeats that had one."""
    curves = [(v.get(f"{method}.rel_predicted"), v.get(f"{method}.rel_observed"),
               v.get(f"{method}.rel_rows")) for v in evals]
    curves = [c for c in curves if isinstance(c[0], list) and c[0]]
    if not curves:
        return {"predicted": [], "observed": [], "rows": []}
    bins = min(len(c[0]) for c in curves)  # type: ignore[arg-type]
    same = [c for c in curves if len(c[0]) == bins]  # type: ignore[arg-type]
    return {key: [float(np.mean([c[i][b] for c in same])) for b in range(bins)]  # type: ignore[index]
            for i, key in enumerate(("predicted", "observed", "rows"))}


def summarize_methods(sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Means over sites per method: per site (judgeable sites only) and weighted by rows.

    ``mean_*`` average the sites whose held-out set can judge (see ``server.assessment``):
    a site with three positives does not count as much as one with ninety. ``weighted_*``
    weight every site by its held-out rows. ``log_loss`` is weighted by held-out rows (all
    sites' held-out rows together).
    """
    ok = {k: v for k, v in sites.items() if v["status"] == "ok"}
    judged = {k: v for k, v in ok.items() if v.get("assessment", {}).get("judgeable", True)}
    methods: dict[str, Any] = {}
    names = [m for m in ("local", "source", "adapted", "pooled", "oracle")
             if any(m in s["metrics"] for s in ok.values())]
    for m in names:
        entries = [(s["metrics"][m], s["n_test"]) for s in ok.values() if m in s["metrics"]]
        per_site = [s["metrics"][m] for s in judged.values() if m in s["metrics"]]
        methods[m] = {
            "mean_auc": _mean([e["auc"] for e in per_site]),
            "mean_accuracy": _mean([e["accuracy"] for e in per_site]),
            "mean_brier": _mean([e["brier"] for e in per_site]),
            "log_loss": _weighted(entries, "log_loss"),
            "weighted_auc": _weighted(entries, "auc"),
            "weighted_accuracy": _weighted(entries, "accuracy"),
            "weighted_brier": _weighted(entries, "brier"),
            "sites_best_auc": sum(s.get("assessment", {}).get("best") == m for s in ok.values()),
            "sites_clearly_best": sum(s.get("assessment", {}).get("best") == m
                                      and s["assessment"].get("lead") == "clear"
                                      for s in ok.values()),
        }
    def majority(entries: dict[str, dict[str, Any]]) -> float | None:
        return _mean([max(s["prevalence_test"], 1 - s["prevalence_test"])
                      for s in entries.values() if s["prevalence_test"] is not None])

    return {"methods": methods, "majority_accuracy": majority(judged),
            "majority_accuracy_all_sites": majority(ok),
            "sites_judged": sorted(judged), "sites_too_small": sorted(set(ok) - set(judged))}


def _weighted(entries: Sequence[tuple[dict[str, Any], int]], key: str) -> float | None:
    pairs = [(e[key], n) for e, n in entries if e.get(key) is not None and n > 0]
    if not pairs:
        return None
    return float(np.average([v for v, _ in pairs], weights=[n for _, n in pairs]))


def rounds_entry(results: Sequence[RepeatResult]) -> list[dict[str, Any]]:
    """Training loss per round, mean and sd over repeats."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        for entry in r.rounds:
            by_round.setdefault(int(entry["round"]), []).append(entry)
    out: list[dict[str, Any]] = []
    for rnd in sorted(by_round):
        entries = by_round[rnd]
        loss, loss_sd, _ = mean_sd([e.get("loss", math.nan) for e in entries])
        gl, gl_sd, _ = mean_sd([e.get("global_loss", math.nan) for e in entries])
        out.append({
            "round": rnd, "loss": loss, "loss_sd": loss_sd, "global_loss": gl,
            "global_loss_sd": gl_sd,
            "rejected": sorted({s for e in entries for s in e.get("rejected", [])}),
            "dropped": sorted({s for e in entries for s in e.get("dropped", [])}),
        })
        sums = [e["secagg"] for e in entries if "secagg" in e]
        if sums:  # secure aggregation: the fewest sites in a total, everyone lost after keys
            out[-1]["secagg"] = {
                "sites": min(x["sites"] for x in sums),
                "lost_after_keys": sorted({n for x in sums for n in x["lost_after_keys"]}),
                "error_bound": max(x["error_bound"] for x in sums)}
        if any("step_accepted" in e for e in entries):  # strategy newton
            out[-1]["step_accepted"] = all(e.get("step_accepted", False) for e in entries)
            out[-1]["step"] = mean_sd([e.get("step", math.nan) for e in entries])[0]
    return out


def dp_entry(name: str, results: Sequence[RepeatResult]) -> dict[str, Any] | None:
    """A site's record-level DP spend in this run, from its train replies; None without DP.

    ``epsilon`` is the latest the site reported (its accountant's total for the run),
    ``per_round`` each round's (a feature group's rounds name their ``group``), and
    ``stopped`` the round from which the site refused to train because its privacy budget
    would be exceeded (with its reason), else None.
    """
    per_round: list[dict[str, Any]] = []
    for r in results:  # the source model's rounds, then each group's (server.groups)
        per_round += [{"repeat": r.repeat, "round": int(e["round"]), **e["dp"][name]}
                      for e in r.rounds if name in e.get("dp", {})]
        per_round += [{"repeat": r.repeat, "round": int(rnd), "group": g["group"],
                       **spent[name]} for g in r.groups
                      for rnd, spent in sorted(g.get("dp", {}).items(), key=lambda i: int(i[0]))
                      if name in spent]
    stopped = next(({"repeat": r.repeat, "round": r.lost[name]["round"],
                     "reason": r.lost[name]["reason"]} for r in results
                    if name in r.lost and "epsilon" in str(r.lost[name]["reason"])), None)
    if not per_round and stopped is None:
        return None
    return {"epsilon": per_round[-1]["epsilon"] if per_round else 0.0,
            "delta": per_round[-1]["delta"] if per_round else None,
            "per_round": per_round, "stopped": stopped}


def client_dp_entry(results: Sequence[RepeatResult]) -> dict[str, Any] | None:
    """The run's client-level DP (dp = "client"), from its rounds; None without it.

    ``epsilon`` is the run's after its last round (per site, at ``delta``: Opacus' RDP
    accountant, every site in every round), ``per_round`` each round's epsilon, the sites
    averaged and the noise's standard deviation on their average.
    """
    per_round = [{"repeat": r.repeat, "round": int(e["round"]), **e["dp_client"]}
                 for r in results for e in r.rounds if "dp_client" in e]
    if not per_round:
        return None
    last = per_round[-1]
    return {
        "mode": "client", "epsilon": last["epsilon"], "delta": last["delta"],
        "noise_multiplier": last["noise_multiplier"], "clipping_norm": last["clipping_norm"],
        "accountant": "opacus rdp, sample rate 1",
        "per_round": [{k: p[k] for k in ("repeat", "round", "epsilon", "sites", "noise_std")}
                      for p in per_round],
    }


def build_report(
    config: dict[str, Any], results: Sequence[RepeatResult], total_seconds: float
) -> dict[str, Any]:
    """The report of a run (contract in docs/report.md; keys are added, never renamed)."""
    names: list[str] = []
    for r in results:
        for name in [*r.evaluate, *r.failures, *r.adapt, *r.lost]:
            if name not in names:
                names.append(name)
    sites = {name: site_entry(name, results) for name in sorted(names)}
    for name, entry in sites.items():
        dp = dp_entry(name, results)
        if dp is not None:
            entry["dp"] = dp
    timing = {"total": total_seconds}
    for phase in ("stats", "train", "groups", "adapt", "evaluate"):
        timing[phase] = float(sum(r.timing.get(phase, 0.0) for r in results))
    client_dp = client_dp_entry(results)
    return {
        # Written only when every phase of every repeat ran; a stopped or failed run writes
        # no report (events.jsonl says why), an interrupted command renames a partial one.
        "status": "complete",
        # dp = "client": the run's per-site guarantee (record-level DP is per site, below).
        **({"dp": client_dp} if client_dp is not None else {}),
        "config": config,
        "sites": sites,
        "rounds": rounds_entry(results),
        "converged_rounds": [r.converged_round for r in results],
        "summary": summarize_methods(sites),
        "timing_s": timing,
        "source_models": [r.source_digest for r in results],
        "notes": list(dict.fromkeys(n for r in results for n in r.notes)),
        "groups": groups_entry(results),
        **({"secagg": secagg_entry(config, results)} if config.get("secagg") else {}),
    }


def secagg_entry(config: Mapping[str, Any], results: Sequence[RepeatResult]
                 ) -> dict[str, Any]:
    """Secure aggregation's settings and what its totals cost in accuracy.

    Nothing is ever clipped: a site whose value would not fit the range refuses the round
    instead (``client.secagg.masked``), so ``largest_clipped`` is 0 in every report that
    exists; ``largest_total`` against ``clip`` is the headroom.
    """
    return {
        "threshold": config.get("secagg-threshold"),
        "neighbours": config.get("secagg-neighbours"),
        "clip": config.get("secagg-clip"),
        "error_bound": max((r.secagg_error_bound for r in results), default=0.0),
        "largest_total": max((r.secagg_largest for r in results), default=0.0),
        "largest_clipped": 0.0,
    }


def groups_entry(results: Sequence[RepeatResult]) -> dict[str, Any]:
    """Per feature group: features, members, rows, rounds, effects, skips, who chose it.

    Rows, rounds and effects are means over the repeats that trained it.
    """
    out: dict[str, Any] = {}
    for name in dict.fromkeys(g["group"] for r in results for g in r.groups):
        trained = [g for r in results for g in r.groups if g["group"] == name
                   and "skipped" not in g]
        every = [g for r in results for g in r.groups if g["group"] == name]
        effects = {k: _mean([g["effects"].get(k) for g in trained])
                   for k in (trained[0]["effects"] if trained else {})}
        chose: dict[str, int] = {}
        for r in results:
            for site, texts in r.texts.items():
                if str(texts.get(protocol.MODEL_CHOICE, "")).startswith(f"group {name}"):
                    chose[site] = chose.get(site, 0) + 1
        out[name] = {
            "features": every[-1]["features"], "members": every[-1]["members"],
            "trained": len(trained), "skipped": [g["skipped"] for g in every if "skipped" in g],
            "rows": _mean([g["rows"] for g in trained]),
            "rounds": _mean([g["rounds"] for g in trained]),
            "effects": effects, "chosen_by": chose,
        }
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    mean, _, _ = mean_sd([v for v in values if v is not None])
    return mean
