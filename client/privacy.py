"""Record-level differential privacy at a site: calibration, accounting and the budget ledger.

With ``dp = "record"`` every training reply of a site is the output of a Gaussian mechanism on
per-patient clipped contributions (DP-SGD for FedAvg / FedProx in ``client.train``, noisy
clipped sums for Newton in ``shared.newton``). This module

- calibrates the noise multiplier so that the planned rounds of one run (``num-server-rounds``
  x ``repeats``, each round ``steps`` steps at sample rate ``q``) spend at most the run's
  epsilon, with Opacus' RDP accountant (``shared.dp_accounting``: nothing is accounted by
  hand);
- charges every round and release to the site's ledger (``client.ledger``: per run id the
  accountant's history (noise multiplier, sample rate, steps) and the epsilon spent). Runs
  compose by basic composition (epsilons and deltas add up): conservative, and simple to
  check by hand;
- releases a site's stats once per version of its data with Gaussian noise
  (:func:`release_summary`), when its policy requires DP;
- before each round, computes the epsilon the site would have spent after it, and refuses
  the round (``client.policy.PolicyRefusal``) when that exceeds the run's budget (the smaller
  of ``dp-epsilon`` and the policy's ``max-epsilon-run``) or what is left of the policy's
  ``max-epsilon-total`` after the other runs. The round is charged to the ledger before the
  site trains (a round that then fails is still counted: conservative).

Randomness of the mechanisms (noise, Poisson sampling) comes from the operating system
(``secrets``), never from a seed the coordinator knows. This module is imported only when DP is
on, and Opacus only when an epsilon is computed: a site without DP does not pay their import.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.dp_accounting import epsilon_spent, noise_multiplier

if TYPE_CHECKING:
    from client.contract import DPRequest, TrainRequest
    from client.policy import Policy
    from client.site import SiteSettings
    from shared.schema import Feature

log = logging.getLogger(__name__)

# Newton: one patient's log-loss is clipped to [0, LOSS_BOUND] nats (a predicted probability of
# the observed class of e^-5 = 0.7 %); the Hessian contribution to HESS_FACTOR * dp-clip^2, as a
# logistic record with ||x|| <= dp-clip has gradient norm <= dp-clip and Hessian norm
# p (1 - p) ||x||^2 <= dp-clip^2 / 4.
LOSS_BOUND = 5.0
HESS_FACTOR = 0.25
# A spend within this relative margin of a budget is within it (float rounding of the RDP sum).
MARGIN = 1e-9


@dataclass(frozen=True)
class Plan:
    """One round's mechanism: noise multiplier, sample rate, steps (the accountant's terms)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def plan_round(dp: DPRequest, budget: float, sample_rate: float, steps: int) -> Plan:
    """The mechanism of every round of the run: calibrated to ``budget`` over all its rounds."""
    sigma = noise_multiplier(budget, dp.delta, sample_rate, steps * dp.rounds)
    return Plan(sigma, sample_rate, steps)


@dataclass(frozen=True)
class Spend:
    """What the site will have spent once the round is released."""

    epsilon: float  # this run, after the round
    delta: float
    total: float  # over every run and release in the ledger (basic composition), after it
    budget: float  # this run's


def charge(
    site_dir: Path, site_name: str, run_id: int, round_key: str, plan: Plan, dp: DPRequest,
    run_budget: tuple[float, str], total_budget: float,
) -> Spend:
    """Charge one round to the site's ledger, or refuse it when it would exceed a budget.

    Parameters
    ----------
    run_budget : (float, str)
        This run's epsilon budget and the rule it comes from (``dp-epsilon`` or
        ``max-epsilon-run``).
    total_budget : float
        The policy's ``max-epsilon-total`` (inf: no limit).

    Raises
    ------
    client.policy.PolicyRefusal
        Naming the rule the round would break; nothing is charged then. Also when the
        ledger cannot be trusted (``client.ledger``).
    """
    from client import ledger as site_ledger
    from client.policy import PolicyRefusal

    budget, rule = run_budget
    this = round_words(round_key)
    with site_ledger.update(site_dir, f"{this} of run {run_id} charged") as ledger:
        run = ledger["runs"].get(str(run_id), {"history": [], "rounds": []})
        history = [tuple(h) for h in run["history"]]
        before = float(run.get("epsilon", 0.0))
        after = epsilon_spent([*history, (plan.noise_multiplier, plan.sample_rate,
                                          plan.steps)], dp.delta)
        others = site_ledger.total_epsilon(ledger, except_run=str(run_id))
        if after > budget * (1 + MARGIN):
            log.warning("site %s stops training: %s would spend epsilon %.3f of this run's "
                        "%.3f (%s); spent %.3f", site_name, this, after, budget, rule, before)
            raise PolicyRefusal(rule, (
                f"{this} would raise this run's epsilon to {after:.3f}, above its "
                f"budget {budget:g} ({rule}); epsilon spent in this run: {before:.3f}"))
        if others + after > total_budget * (1 + MARGIN):
            log.warning("site %s stops training: %s would bring its total epsilon to %.3f, "
                        "above max-epsilon-total %.3f; this run spent %.3f", site_name, this,
                        others + after, total_budget, before)
            raise PolicyRefusal("max-epsilon-total", (
                f"{this} would bring the site's total epsilon to {others + after:.3f}"
                f" (earlier runs and releases {others:.3f}), above max-epsilon-total "
                f"{total_budget:g}; epsilon spent in this run: {before:.3f}"))
        if history and tuple(history[-1][:2]) == (plan.noise_multiplier, plan.sample_rate):
            last = history[-1]
            history[-1] = (last[0], last[1], int(last[2]) + plan.steps)
        else:
            history.append((plan.noise_multiplier, plan.sample_rate, plan.steps))
        ledger["runs"][str(run_id)] = {
            "history": [list(h) for h in history], "delta": dp.delta, "budget": budget,
            "epsilon": after, "rounds": [*run.get("rounds", []), round_key],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    log.info("site %s: %s charged, epsilon %.3f of %.3f in this run (total %.3f)",
             site_name, this, after, budget, others + after)
    return Spend(after, dp.delta, others + after, budget)


def charge_release(site_dir: Path, site_name: str, key: str, epsilon: float, delta: float,
                   total_budget: float, what: str) -> float:
    """Charge a one-off noisy release (the stats) to the ledger, or refuse it.

    Returns
    -------
    float
        The site's total epsilon after the release.

    Raises
    ------
    client.policy.PolicyRefusal
        ``max-epsilon-total`` when it would exceed the total budget; nothing is charged then.
    """
    from client import ledger as site_ledger
    from client.policy import PolicyRefusal

    with site_ledger.update(site_dir, f"{what} released") as ledger:
        before = site_ledger.total_epsilon(ledger)
        if before + epsilon > total_budget * (1 + MARGIN):
            log.warning("site %s refuses to release %s: its total epsilon would reach %.3f, "
                        "above max-epsilon-total %.3f", site_name, what, before + epsilon,
                        total_budget)
            raise PolicyRefusal("max-epsilon-total", (
                f"releasing {what} would bring the site's total epsilon to "
                f"{before + epsilon:.3f}, above max-epsilon-total {total_budget:g}"))
        ledger["releases"][key] = {"what": what, "epsilon": epsilon, "delta": delta,
                                   "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    log.info("site %s: %s released at epsilon %.3f (total %.3f)", site_name, what, epsilon,
             before + epsilon)
    return before + epsilon


def budgets(dp: DPRequest, policy: Policy) -> tuple[tuple[float, str], float, float]:
    """Return the run's budget and its rule, the total budget, and the delta to account with."""
    cap = policy.max_epsilon_run
    run = (cap, "max-epsilon-run") if cap < dp.epsilon else (dp.epsilon, "dp-epsilon")
    return run, policy.max_epsilon_total, min(dp.delta, policy.delta)


def round_words(key: str) -> str:
    """A ledger round key in words: ``0/2`` is "round 2", ``1/2`` "round 2 of repeat 2"."""
    repeat, _, rnd = key.partition("/")
    return f"round {rnd}" + (f" of repeat {int(repeat) + 1}" if repeat not in ("", "0") else "")


def prepare_round(site: SiteSettings, policy: Policy, request: TrainRequest,
                  sample_rate: float, steps: int) -> tuple[DPRequest, Plan, Spend]:
    """A record-level DP round: its request, calibrated mechanism and spend, charged.

    Raises
    ------
    client.policy.PolicyRefusal
        When the round would exceed the run's or the site's total epsilon budget, or the
        ledger cannot be trusted.
    client.contract.ContractError
        When the message asks for no record-level DP.
    """
    from client.contract import ContractError

    if request.dp is None or request.dp.mode != "record":
        raise ContractError("this round is not a record-level DP round")
    run_budget, total, delta = budgets(request.dp, policy)
    dp = replace(request.dp, delta=delta)
    plan = plan_round(dp, run_budget[0], sample_rate, steps)
    spend = charge(site.site_dir, site.name, request.run_id, request.round_key, plan, dp,
                   run_budget, total)
    return dp, plan, spend


def release_summary(summary: Mapping[str, list[float]], features: Sequence[Feature],
                    epsilon: float, delta: float, rng: np.random.Generator
                    ) -> tuple[dict[str, list[float]], float]:
    """The stats of a site's training rows, released once with the Gaussian mechanism.

    Each row's part is bounded first: a numeric feature's value ``v`` in its schema range
    ``[lo, hi]`` enters as ``u = (v - c) / r`` (``c`` the range's middle, ``r`` its half
    width, so ``|u| <= 1``) through its count, the sum of ``u`` and the sum of ``u**2``; a
    categorical feature through its category's count; the label through its class's count.
    One training row moves these by an L2 norm of at most ``sqrt(3 * numeric + categorical
    + 1)``; a held-out row moves only the held-out count, by 1. Gaussian noise of that
    sensitivity times the noise multiplier Opacus' RDP accountant calibrates for one step at
    ``epsilon``, ``delta`` is added once; everything after is post-processing: counts
    rounded and kept within the rows, sums kept within the range, spreads non-negative, the
    missing counts and the row count derived.

    Parameters
    ----------
    summary : mapping
        ``shared.preprocessing.summarize`` of the training rows, plus ``label-negative``,
        ``label-positive`` and ``n-test``.
    features : sequence of Feature
        The shared features (numeric and binary ones need a range in the schema).
    epsilon, delta : float
        The release's budget.
    rng : numpy.random.Generator
        Seeded from the operating system by the caller.

    Returns
    -------
    dict, float
        The released summary (same keys) and the noise multiplier used.

    Raises
    ------
    ContractError
        If a numeric feature has no valid range: its values cannot be bounded.
    """
    from client.contract import ContractError

    numeric = [f for f in features if f.kind != "categorical"]
    categorical = [f for f in features if f.kind == "categorical"]
    unbounded = [f.name for f in numeric if f.kind == "numeric" and f.valid_range is None]
    if unbounded:
        raise ContractError(f"features {unbounded} have no valid range in the schema: the "
                            "stats cannot be released under differential privacy")
    sensitivity = math.sqrt(3 * len(numeric) + len(categorical) + 1)
    sigma = noise_multiplier(epsilon, delta, 1.0, 1)

    def noisy(value: float) -> float:
        return float(value + rng.normal(0.0, sigma * sensitivity))

    negative = max(0, round(noisy(summary["label-negative"][0])))
    positive = max(0, round(noisy(summary["label-positive"][0])))
    n = max(1, negative + positive)
    out: dict[str, list[float]] = {"rows": [float(n)]}
    for f in numeric:
        lo, hi = f.valid_range if f.valid_range is not None else (0.0, 1.0)
        c, r = (lo + hi) / 2, (hi - lo) / 2 or 1.0
        count, total = summary[f"{f.name}.count"][0], summary[f"{f.name}.sum"][0]
        mean = total / count if count else c
        s1 = (total - count * c) / r
        s2 = (summary[f"{f.name}.m2"][0] + count * (mean - c) ** 2) / r ** 2
        k = min(n, max(0, round(noisy(count))))
        released_sum = min(max(c * k + r * noisy(s1), lo * k), hi * k)
        squares = r ** 2 * min(max(noisy(s2), 0.0), float(k))  # sum of (v - c)**2
        spread = squares - (released_sum - c * k) ** 2 / k if k else 0.0
        out[f"{f.name}.count"] = [float(k)]
        out[f"{f.name}.sum"] = [released_sum]
        out[f"{f.name}.m2"] = [max(spread, 0.0)]
        out[f"{f.name}.missing"] = [float(n - k)]
    for f in categorical:
        counts = [float(max(0, round(noisy(v)))) for v in summary[f"{f.name}.counts"]]
        out[f"{f.name}.counts"] = counts
        out[f"{f.name}.missing"] = [float(max(0.0, n - sum(counts)))]
    out.update({"num-examples": [float(n)], "label-negative": [float(negative)],
                "label-positive": [float(positive)],
                "n-test": [float(max(0, round(noisy(summary["n-test"][0]))))]})
    return out, sigma
