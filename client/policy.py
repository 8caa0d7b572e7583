"""A site's own policy: what it runs, which phases it answers, what may leave it (a TOML file).

The site names the file in its SuperNode's ``node_config`` (``policy="/srv/fedadapt/policy.toml"``)
or, in simulation, in its manifest entry (``policy = "..."``). Without one, a deployed site
applies the deployment's defaults (:data:`DEPLOYED`) and a simulated site answers every phase of
any app (either says so once in its log). The rules are enforced by the ClientApp
(``client.client_app``) before any work; the approved-app rule, which must hold before any
shipped code runs, by the site's own executor (``executor.approved_app``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import textwrap
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from client.site import SiteSettings
from shared.errors import FedadaptError
from shared.tomlfile import read_toml

if TYPE_CHECKING:
    from client.contract import Request

log = logging.getLogger(__name__)

PHASES = ("stats", "train", "adapt", "evaluate")
# The policy file of the site's own executor (`fedadapt site-exec --policy`), handed to the
# ClientApp processes it starts: it wins over node_config's `policy`.
POLICY_ENV = "FEDADAPT_SITE_POLICY"
HASH = re.compile(r"[0-9a-f]{64}")


class PolicyError(FedadaptError, ValueError):
    """A policy file that cannot be used; the message names file, line and column."""


class PolicyRefusal(FedadaptError):
    """A request outside the site's policy: refused with the rule named, never partly answered."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def _rule(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Policy:
    """The rules of one site. Field ``a_b`` is the file's key ``a-b``; every key is optional.

    The defaults here are a simulation's, where the researcher owns every site; a deployed
    site's defaults are :data:`DEPLOYED` (differential privacy required, finite budgets), and
    a key its policy file leaves out takes the deployed default.
    """

    approved_apps: tuple[str, ...] = _rule(
        (), "sha256 of the app bundles the site runs (`fedadapt app-hash`); empty: any app")
    phases: tuple[str, ...] = _rule(PHASES, "the phases the site answers")
    min_rows: int = _rule(
        0, "fewest rows any aggregate the site sends may rest on (a count or sum over fewer "
        "rows is refused)")
    max_rounds: int = _rule(
        0, "most training rounds the site takes part in, over all runs (0: no limit)")
    require_dp: bool = _rule(
        False, "answer only under differential privacy: training with dp = \"record\", the "
        "stats released once with noise, no evaluation or model-choice scores sent")
    require_secagg: bool = _rule(
        False, "send sums only masked by secure aggregation (the run's secagg = true): a "
        "plain stats or training reply is refused")
    max_epsilon_run: float = _rule(
        math.inf, "largest epsilon (at `delta`) one run may spend on the site's patients")
    max_epsilon_total: float = _rule(
        math.inf, "largest epsilon (at `delta`) all runs and the stats release together may "
        "spend")
    stats_epsilon: float = _rule(
        0.5, "epsilon of the one noisy release of the stats per version of the data file "
        "(with require-dp)")
    input_bound: float = _rule(
        10.0, "every model input at the site is clipped into [-input-bound, input-bound], "
        "whatever preprocessing the coordinator sends")
    delta: float = _rule(1e-5, "the delta at which the epsilons are stated; a run asking for "
                         "a larger delta is refused")
    path: Path | None = None
    deployed: bool = False  # whose defaults the keys not in the file take

    def describe(self) -> list[str]:
        """What the policy allows, one line per rule, in words."""
        apps = ("any app bundle (no approved-apps: the site trusts the coordinator's code)"
                if not self.approved_apps else
                "app bundles with sha256 " + ", ".join(self.approved_apps))
        eps = [(self.max_epsilon_run, "per run"), (self.max_epsilon_total, "over all runs")]
        budget = "; ".join(f"epsilon {e:g} {what}" if math.isfinite(e) else f"no epsilon "
                           f"limit {what}" for e, what in eps)
        private = (f"only under differential privacy (training with dp = \"record\"; the "
                   f"stats released once with noise, epsilon {self.stats_epsilon:g}; no "
                   "evaluation or model-choice scores sent)" if self.require_dp else
                   "without differential privacy too: a coordinator can reconstruct patients' "
                   "values from exact training replies and scores (README, threat model)")
        return [
            f"runs: {apps}",
            f"answers phases: {', '.join(self.phases) or 'none'}"
            + (f" (refuses {', '.join(p for p in PHASES if p not in self.phases)})"
               if set(self.phases) != set(PHASES) else ""),
            "aggregates: " + (f"each rests on at least {self.min_rows} rows"
                              if self.min_rows else "no minimum number of rows"),
            "training: " + (f"at most {self.max_rounds} rounds over all runs" if self.max_rounds
                            else "any number of rounds"),
            f"answers {private}",
            "sums: " + ("sent only masked by secure aggregation (the coordinator learns the "
                        "federation's totals, never this site's)" if self.require_secagg
                        else "sent plainly unless the run uses secure aggregation"),
            f"privacy budget: {budget} (delta {self.delta:g})",
            f"model inputs: clipped into [-{self.input_bound:g}, {self.input_bound:g}]",
        ]

    def allows(self, phase: str) -> None:
        """Refuse ``phase`` unless the policy lists it.

        Raises
        ------
        PolicyRefusal
            With rule ``phases``.
        """
        if phase not in self.phases:
            raise PolicyRefusal("phases", f"this site does not answer the {phase} phase "
                                f"(its policy allows {', '.join(self.phases) or 'none'})")

    def check_rows(self, what: str, rows: int) -> None:
        """Refuse an aggregate over ``rows`` rows when fewer than ``min-rows``.

        Raises
        ------
        PolicyRefusal
            With rule ``min-rows``.
        """
        if rows < self.min_rows:
            # The count itself is not said: it would be part of the refused answer.
            raise PolicyRefusal("min-rows", f"{what} would rest on fewer rows than the "
                                f"policy's min-rows = {self.min_rows}")

    def check_training(self, rounds: int, dp: str, epsilon: float, delta: float) -> None:
        """Refuse a training round the policy does not accept (rounds, DP, run budget).

        Parameters
        ----------
        rounds : int
            Training rounds the site will have taken part in with this one.

        Raises
        ------
        PolicyRefusal
            With rule ``max-rounds``, ``require-dp``, ``max-epsilon-run`` or ``delta``.
        """
        if self.max_rounds and rounds > self.max_rounds:
            raise PolicyRefusal("max-rounds", f"the site has taken part in {rounds - 1} "
                                f"training rounds, the policy's max-rounds = {self.max_rounds}")
        if dp != "record":
            if self.require_dp:
                raise PolicyRefusal("require-dp", "the policy requires record-level "
                                    "differential privacy: run with dp = \"record\"")
            return
        if epsilon > self.max_epsilon_run:
            raise PolicyRefusal("max-epsilon-run", f"the run asks for epsilon {epsilon:g}, "
                                f"more than the policy's max-epsilon-run = "
                                f"{self.max_epsilon_run:g}")
        if delta > self.delta:
            raise PolicyRefusal("delta", f"the run asks for delta {delta:g}, more than the "
                                f"policy's delta = {self.delta:g}")


NO_POLICY = Policy()
# A deployed site's defaults: what `fedadapt init-site` writes, and what a deployed site without
# a policy file applies. Answering without DP takes an explicit `require-dp = false`.
DEPLOYED = Policy(min_rows=20, require_dp=True, max_epsilon_run=3.0, max_epsilon_total=10.0,
                  deployed=True)



def admit(policy: Policy, phase: str, request: Request, site: SiteSettings,
          masked: bool = False) -> None:
    """Refuse a request the policy does not accept, before any data is read.

    A training round is counted in the site's ledger (``client.ledger``) when the site is
    deployed or its policy limits rounds: ``max-rounds`` counts every round the site took
    part in, over all runs, whatever round numbers the coordinator sends; a round that then
    fails counts too.

    Parameters
    ----------
    policy : Policy
        The site's policy.
    phase : str
        ``stats``, ``train``, ``adapt`` or ``evaluate``.
    request : client.contract.Request
        The parsed message (a training round's DP request).
    site : SiteSettings
        The site (its folder holds the ledger).
    masked : bool
        The reply will leave masked, inside a secure sum (``client.secure_reply``).

    Raises
    ------
    PolicyRefusal
        Naming the rule (``ledger`` when the ledger cannot be trusted).
    """
    policy.allows(phase)
    if policy.require_secagg and not masked and phase in ("stats", "train"):
        raise PolicyRefusal("require-secagg", f"the policy sends sums only masked: run with "
                            f"secagg = true (this {phase} reply would leave plain)")
    if phase != "train":
        return
    dp = getattr(request, "dp", None)

    def check(rounds: int) -> None:
        policy.check_training(rounds, dp.mode if dp is not None else "off",
                              dp.epsilon if dp is not None else math.inf,
                              dp.delta if dp is not None else 1.0)

    if site.deployed or policy.max_rounds:
        from client.ledger import count_round

        count_round(site.site_dir, check)
    else:
        check(1)


def check_reply_rows(policy: Policy, reply: Message) -> None:
    """Refuse a reply holding a feature's count and sum over fewer than ``min-rows`` values.

    A feature observed in no row at all is sent as zeros, which say nothing about any row.

    Raises
    ------
    PolicyRefusal
        With rule ``min-rows``.
    """
    if not policy.min_rows or policy.require_dp or not reply.has_content():
        return  # under require-dp the counts are noisy releases: DP, not min-rows, guards them
    for record in reply.content.metric_records.values():
        for key, value in record.items():
            if key.endswith(".count") and isinstance(value, list):
                low = [v for v in value if 0 < v < policy.min_rows]
                if low:
                    feature = key.removesuffix(".count")
                    policy.check_rows(f"the sum of feature {feature!r}", int(min(low)))


def read_policy(path: str | Path, deployed: bool = True) -> Policy:
    """Read and check a site policy.

    Parameters
    ----------
    path : str or Path
        The TOML file.
    deployed : bool
        Keys the file leaves out take the deployment's defaults (:data:`DEPLOYED`: DP
        required, finite budgets); False for a simulated site (:data:`NO_POLICY`).

    Returns
    -------
    Policy
        With ``path`` set to the absolute file path.

    Raises
    ------
    PolicyError
        For a missing or unreadable file, invalid TOML, an unknown key or a bad value, naming
        file, line and column.
    """
    path = Path(path).expanduser().resolve()
    doc = read_toml(path, "policy file", PolicyError)
    known = {f.name.replace("_", "-"): f for f in fields(Policy)
             if f.name not in ("path", "deployed")}
    values: dict[str, Any] = {}
    for key, value in doc.data.items():
        if key not in known:
            what = "table" if isinstance(value, dict) else "key"
            raise PolicyError(f"{doc.where(key)}: unknown {what} {key!r}; known keys: "
                              f"{', '.join(known)}")
        values[known[key].name] = _value(doc.where(key), key, value)
    base = DEPLOYED if deployed else NO_POLICY
    policy = replace(base, **values, path=path)
    for key, problem, entry in _problems(policy):
        raise PolicyError(f"{doc.where(key, value=entry)}: {problem}")
    return policy


def _value(where: str, key: str, value: Any) -> Any:
    """The value of ``key`` in the policy's type, or a PolicyError saying what is expected."""
    if key in ("approved-apps", "phases"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(f"{where}: {key} must be a list of strings")
        return tuple(v.strip().lower() if key == "approved-apps" else v for v in value)
    if key in ("require-dp", "require-secagg"):
        if not isinstance(value, bool):
            raise PolicyError(f"{where}: {key} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(f"{where}: {key} must be a number")
    if key in ("min-rows", "max-rounds"):
        if not isinstance(value, int) or not 0 <= value < 2**63:
            raise PolicyError(f"{where}: {key} must be a whole number, 0 or more")
        return value
    try:
        return float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise PolicyError(f"{where}: {key} is too large: write inf for no limit") from None


def _problems(policy: Policy) -> list[tuple[str, str, str | None]]:
    """(key, problem, the list entry at fault or None) for values that cannot be used."""
    problems: list[tuple[str, str, str | None]] = []
    bad_hashes = [h for h in policy.approved_apps if not HASH.fullmatch(h)]
    if bad_hashes:
        problems.append(("approved-apps", f"approved-apps entry {bad_hashes[0][:70]!r} is not "
                         "a sha256 hash (64 hex digits, as `fedadapt app-hash` prints them)",
                         bad_hashes[0]))
    unknown = [p for p in policy.phases if p not in PHASES]
    if unknown:
        problems.append(("phases", f"unknown phase(s) {unknown}; phases: {', '.join(PHASES)}",
                         None))
    for key in ("max_epsilon_run", "max_epsilon_total", "stats_epsilon", "input_bound"):
        if not getattr(policy, key) > 0:
            problems.append((key.replace("_", "-"), f"{key.replace('_', '-')} must be positive",
                             None))
    if not math.isfinite(policy.input_bound):
        problems.append(("input-bound", "input-bound must be finite: it is what keeps every "
                         "number the site computes finite", None))
    if policy.require_dp:
        for key in ("max_epsilon_run", "max_epsilon_total"):
            if not math.isfinite(getattr(policy, key)):
                problems.append((key.replace("_", "-"), f"require-dp needs a finite "
                                 f"{key.replace('_', '-')}: without one any epsilon the "
                                 "coordinator asks for is accepted", None))
    if not 0 < policy.delta < 1:
        problems.append(("delta", "delta must be between 0 and 1", None))
    return problems


def site_policy(site: SiteSettings, state: RecordDict | None = None) -> Policy:
    """The policy a site's settings name (``policy``), else its defaults.

    A deployed site without a policy file applies :data:`DEPLOYED`; a simulated one
    :data:`NO_POLICY`. A deployed site that answers without differential privacy says once
    per run, in its log, what a coordinator can then reconstruct.

    Parameters
    ----------
    site : SiteSettings
        The site.
    state : RecordDict, optional
        The node's state in this run (``context.state``): what is said once per run is
        remembered there.

    Raises
    ------
    PolicyError
        If the named file cannot be used.
    """
    pinned = os.environ.get(POLICY_ENV, "").strip()
    if pinned:
        # The site's own executor (`fedadapt site-exec --policy`) started this process: its
        # policy, which already approved this app, is the one applied.
        if site.policy is not None and Path(pinned).resolve() != site.policy:
            log.warning("node_config names policy %s; the site executor's %s is the one "
                        "applied", site.policy, pinned)
        policy = read_policy(pinned, deployed=site.deployed)
    elif site.policy is not None:
        policy = read_policy(site.policy, deployed=site.deployed)
    else:
        policy = DEPLOYED if site.deployed else NO_POLICY
        _once(state, NO_POLICY_SAID, logging.WARNING if site.deployed else logging.INFO,
              "no site policy (node_config policy=...): this site "
              + ("applies the deployment's defaults: " + "; ".join(policy.describe()[1:])
                 if site.deployed else "answers every phase of any app, as the coordinator "
                 "asks (a simulation: the researcher owns every site)"))
    if site.deployed and not policy.require_dp:
        _once(state, OPEN_SAID, logging.WARNING, OPEN_WARNING)
    return policy


def policy_text(policy: Policy = DEPLOYED) -> str:
    """A policy file stating every rule of ``policy``, each with what it means (TOML)."""
    lines = ["# A fedadapt site's policy: what this site runs, answers and lets leave it.",
             "# Written by `fedadapt init-site`; check it with `fedadapt check-policy FILE`.",
             "# A key left out takes the deployment's default; answering without differential",
             "# privacy takes an explicit `require-dp = false`.", ""]
    for f in fields(Policy):
        if f.name in ("path", "deployed"):
            continue
        lines += [*textwrap.wrap(f.metadata["help"], 98, initial_indent="# ",
                                 subsequent_indent="# "),
                  f"{f.name.replace('_', '-')} = {_toml(getattr(policy, f.name))}", ""]
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return repr(value)


def _once(state: RecordDict | None, key: str, level: int, text: str) -> None:
    """Log ``text`` once per run (per node state)."""
    if state is not None and key in state.config_records:
        return
    log.log(level, "%s", text)
    if state is not None:
        state[key] = ConfigRecord({"said": True})


# What a deployed site answering without DP says once per run (the threat model's words).
OPEN_WARNING = (
    "this site answers WITHOUT differential privacy (its policy says require-dp = false): a "
    "coordinator sees its exact training replies, held-out scores and model choices, "
    "computed at weights it chooses, and can reconstruct patients' values from them "
    "(exactly, with crafted weights over a few rounds); only min-rows and the fixed stats "
    "answer limit it")
NO_POLICY_SAID = "fedadapt-no-policy-said"
OPEN_SAID = "fedadapt-open-said"
