"""Record-level differential privacy at a site: calibration, accounting and the budget ledger.

With ``dp = "record"`` every training reply of a site is the output of a Gaussian mechanism on
per-patient clipped contributions (DP-SGD for FedAvg / FedProx in ``client.train``, noisy
clipped sums for Newton in ``shared.newton``). This module

- calibrates the noise multiplier so that the planned rounds of one run (``num-server-rounds``
  x ``repeats``, each round ``steps`` steps at sample rate ``q``) spend at most the run's
  epsilon, with Opacus' RDP accountant (``opacus.accountants``; nothing is accounted by hand);
- keeps the site's privacy ledger, ``privacy-ledger.json`` in its private folder: per run id
  the accountant's history (noise multiplier, sample rate, steps) and the epsilon spent. Runs
  compose by basic composition (epsilons and deltas add up): conservative, and simple to
  check by hand;
- before each round, computes the epsilon the site would have spent after it, and refuses
  the round (``client.policy.PolicyRefusal``) when that exceeds the run's budget (the smaller
  of ``dp-epsilon`` and the policy's ``max-epsilon-run``) or what is left of the policy's
  ``max-epsilon-total`` after the other runs. The round is charged to the ledger before the
  site trains (a round that then fails is still counted: conservative).

Randomness of the mechanisms (noise, Poisson sampling) comes from the operating system
(``secrets``), never from a seed the coordinator knows. Opacus is imported here, and this module
only when DP is on: a site without DP does not pay its import.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.files import write_atomically
from shared.protocol import absolute_round
from shared.settings import SettingsError

log = logging.getLogger(__name__)

LEDGER = "privacy-ledger.json"
LEDGER_VERSION = 1
# Newton: one patient's log-loss is clipped to [0, LOSS_BOUND] nats (a predicted probability of
# the observed class of e^-5 = 0.7 %); the Hessian contribution to HESS_FACTOR * dp-clip^2, as a
# logistic record with ||x|| <= dp-clip has gradient norm <= dp-clip and Hessian norm
# p (1 - p) ||x||^2 <= dp-clip^2 / 4.
LOSS_BOUND = 5.0
HESS_FACTOR = 0.25
# A spend within this relative margin of a budget is within it (float rounding of the RDP sum).
MARGIN = 1e-9
# RDP orders for calibration and accounting alike: Opacus' defaults (1.1 ... 63) and larger
# ones, which the few, very noisy full-batch steps of a short run need for a tight bound.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [
    80, 96, 128, 192, 256, 384, 512, 1024]


@dataclass(frozen=True)
class DPConfig:
    """What a train message asks of a site's record-level DP.

    Attributes
    ----------
    epsilon, delta : float
        The (epsilon, delta) one run may spend at this site (``dp-epsilon``, ``dp-delta``).
    clip : float
        ``dp-clip``: the L2 bound of one patient's gradient.
    rounds : int
        Planned training rounds of the whole run (``num-server-rounds`` x ``repeats``).
    """

    epsilon: float
    delta: float
    clip: float
    rounds: int


def dp_config(config: Mapping[str, Any]) -> DPConfig | None:
    """The train message's DP request; None when DP is off (or the message names none).

    Raises
    ------
    SettingsError
        If the mode is unknown, ``client`` (client-level DP has no record-level accounting
        at the site: it clips FedAvg / FedProx updates, client.jobs), or a value is unusable.
    """
    mode = str(config.get("dp", "off"))
    if mode == "off":
        return None
    if mode == "client":
        raise SettingsError("dp = 'client' only clips FedAvg / FedProx model updates at a "
                            "site (the coordinator adds the noise): no Newton round, no "
                            "record-level accounting")
    if mode != "record":
        raise SettingsError(f"dp = {mode!r} is not known at the sites (off, record, client)")
    rounds = int(config.get("num-server-rounds", 0)) * max(1, int(config.get("repeats", 1)))
    out = DPConfig(float(config.get("dp-epsilon", 0.0)), float(config.get("dp-delta", 0.0)),
                   float(config.get("dp-clip", 0.0)), rounds)
    if not (out.epsilon > 0 and 0 < out.delta < 1 and out.clip > 0 and out.rounds > 0):
        raise SettingsError("dp = 'record' needs dp-epsilon > 0, 0 < dp-delta < 1, dp-clip > 0 "
                            "and the planned num-server-rounds in the train message")
    return out


def epsilon_spent(history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a sequence of (noise multiplier, sample rate, steps), Opacus' RDP accountant."""
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(s), float(q), int(k)) for s, q, k in history]
    return float(accountant.get_epsilon(delta=delta, alphas=ALPHAS))


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier for which ``steps`` steps at ``sample_rate`` spend ``epsilon``.

    The smallest (within Opacus' tolerance of 0.01 on epsilon) that spends at most it.
    """
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant="rdp",
                                      epsilon_tolerance=0.01, alphas=ALPHAS))


@dataclass(frozen=True)
class Plan:
    """One round's mechanism: noise multiplier, sample rate, steps (the accountant's terms)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def plan_round(dp: DPConfig, budget: float, sample_rate: float, steps: int) -> Plan:
    """The mechanism of every round of the run: calibrated to ``budget`` over all its rounds."""
    sigma = noise_multiplier(budget, dp.delta, sample_rate, steps * dp.rounds)
    return Plan(sigma, sample_rate, steps)


@dataclass(frozen=True)
class Spend:
    """What the site will have spent once the round is released."""

    epsilon: float  # this run, after the round
    delta: float
    total: float  # over every run in the ledger (basic composition), after the round
    budget: float  # this run's


def _ledger_path(site_dir: Path) -> Path:
    return Path(site_dir) / LEDGER


def read_ledger(site_dir: Path) -> dict[str, Any]:
    """The site's ledger (an empty one if it has none).

    Raises
    ------
    SettingsError
        If the file exists but cannot be read as a ledger: the site then refuses to train
        rather than forget what it has spent.
    """
    path = _ledger_path(site_dir)
    if not path.exists():
        return {"version": LEDGER_VERSION, "runs": {}}
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(ledger.get("runs"), dict):
            raise ValueError("no runs")
    except (OSError, ValueError) as err:
        raise SettingsError(f"the privacy ledger {path} is unreadable ({type(err).__name__}); "
                            "training with DP stops until it is restored") from None
    return ledger


def _write_ledger(site_dir: Path, ledger: dict[str, Any]) -> None:
    write_atomically(_ledger_path(site_dir), json.dumps(ledger, indent=1).encode("utf-8"),
                     mode=0o600)


@contextlib.contextmanager
def _locked(site_dir: Path) -> Iterator[None]:
    """One ledger update at a time in this site's folder (read, check, write)."""
    Path(site_dir).mkdir(parents=True, exist_ok=True)
    with (Path(site_dir) / f".{LEDGER}.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def spent_elsewhere(ledger: Mapping[str, Any], run_id: int) -> float:
    """Epsilon spent by every other run in the ledger (their sum: basic composition)."""
    return float(sum(float(r.get("epsilon", 0.0)) for k, r in ledger["runs"].items()
                     if k != str(run_id)))


def charge(
    site_dir: Path, site_name: str, run_id: int, round_key: str, plan: Plan, dp: DPConfig,
    run_budget: tuple[float, str], total_budget: float,
) -> Spend:
    """Charge one round to the ledger, or refuse it when it would exceed a budget.

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
        Naming the rule the round would break; nothing is charged then.
    """
    from client.policy import PolicyRefusal

    budget, rule = run_budget
    with _locked(site_dir):
        ledger = read_ledger(site_dir)
        run = ledger["runs"].get(str(run_id), {"history": [], "rounds": []})
        history = [tuple(h) for h in run["history"]]
        before = float(run.get("epsilon", 0.0))
        after = epsilon_spent([*history, (plan.noise_multiplier, plan.sample_rate,
                                          plan.steps)], dp.delta)
        others = spent_elsewhere(ledger, run_id)
        this = round_words(round_key)
        if after > budget * (1 + MARGIN):
            log.warning("site %s stops training: round %s would spend epsilon %.3f of this "
                        "run's %.3f (%s); spent %.3f", site_name, this, after, budget,
                        rule, before)
            raise PolicyRefusal(rule, (
                f"{this} would raise this run's epsilon to {after:.3f}, above its "
                f"budget {budget:g} ({rule}); epsilon spent in this run: {before:.3f}"))
        if others + after > total_budget * (1 + MARGIN):
            log.warning("site %s stops training: round %s would bring its total epsilon to "
                        "%.3f, above max-epsilon-total %.3f; this run spent %.3f", site_name,
                        this, others + after, total_budget, before)
            raise PolicyRefusal("max-epsilon-total", (
                f"{this} would bring the site's total epsilon to {others + after:.3f}"
                f" (earlier runs {others:.3f}), above max-epsilon-total {total_budget:g}; "
                f"epsilon spent in this run: {before:.3f}"))
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
        ledger["version"] = LEDGER_VERSION
        ledger["total-epsilon"] = others + after
        ledger["total-delta"] = float(sum(float(r.get("delta", 0.0))
                                          for r in ledger["runs"].values()))
        _write_ledger(site_dir, ledger)
    log.info("site %s: %s charged, epsilon %.3f of %.3f in this run (total %.3f)",
             site_name, round_words(round_key), after, budget, others + after)
    return Spend(after, dp.delta, others + after, budget)


def budgets(dp: DPConfig, policy: Any) -> tuple[tuple[float, str], float, float]:
    """Return the run's budget and its rule, the total budget, and the delta to account with."""
    cap = float(getattr(policy, "max_epsilon_run", math.inf))
    run = (cap, "max-epsilon-run") if cap < dp.epsilon else (dp.epsilon, "dp-epsilon")
    total = float(getattr(policy, "max_epsilon_total", math.inf))
    delta = min(dp.delta, float(getattr(policy, "delta", dp.delta) or dp.delta))
    return run, total, delta


def round_words(key: str) -> str:
    """A ledger round key in words: ``0/2`` is "round 2", ``1/2`` "round 2 of repeat 2"."""
    repeat, _, rnd = key.partition("/")
    return f"round {rnd}" + (f" of repeat {int(repeat) + 1}" if repeat not in ("", "0") else "")


def round_key(config: Mapping[str, Any]) -> str:
    """The round's name in the ledger: repeat and absolute round (a resumed run counts on)."""
    rnd = absolute_round(config) or 0
    return f"{int(config.get('repeat', 0))}/{rnd}"


def prepare_round(
    site: Any, config: Mapping[str, Any], run_id: int, sample_rate: float, steps: int,
) -> tuple[Plan, Spend] | None:
    """For a DP round: its calibrated mechanism, charged to the ledger. None when DP is off.

    Raises
    ------
    client.policy.PolicyRefusal
        When the round would exceed the run's or the site's total epsilon budget.
    """
    dp = dp_config(config)
    if dp is None:
        return None
    from client.policy import site_policy

    run_budget, total, delta = budgets(dp, site_policy(site))
    dp = DPConfig(dp.epsilon, delta, dp.clip, dp.rounds)
    plan = plan_round(dp, run_budget[0], sample_rate, steps)
    spend = charge(site.site_dir, site.name, run_id, round_key(config), plan, dp, run_budget,
                   total)
    return plan, spend
