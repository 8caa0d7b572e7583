"""A site's own policy: what it runs, which phases it answers, what may leave it (a TOML file).

The site names the file in its SuperNode's ``node_config`` (``policy="/srv/fedadapt/policy.toml"``)
or, in simulation, in its manifest entry (``policy = "..."``). Without one a site answers every
phase of any app, as before (said once in its log). The rules are enforced by the ClientApp
(``client.client_app``) before any work; the approved-app rule, which must hold before any
shipped code runs, by the site's own executor (``client.approved_app``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict

from client.site import SiteSettings
from shared.protocol import absolute_round

log = logging.getLogger(__name__)

PHASES = ("stats", "train", "adapt", "evaluate")
# The policy file of the site's own executor (`fedadapt site-exec --policy`), handed to the
# ClientApp processes it starts: it wins over node_config's `policy`.
POLICY_ENV = "FEDADAPT_SITE_POLICY"
HASH = re.compile(r"[0-9a-f]{64}")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names file, line and column."""


class PolicyRefusal(Exception):
    """A request outside the site's policy: refused with the rule named, never partly answered."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def _rule(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Policy:
    """The rules of one site. Field ``a_b`` is the file's key ``a-b``; every key is optional."""

    approved_apps: tuple[str, ...] = _rule(
        (), "sha256 of the app bundles the site runs (`fedadapt app-hash`); empty: any app")
    phases: tuple[str, ...] = _rule(PHASES, "the phases the site answers")
    min_rows: int = _rule(
        0, "fewest rows any aggregate the site sends may rest on (a count or sum over fewer "
        "rows is refused)")
    max_rounds: int = _rule(0, "most training rounds the site takes part in (0: no limit)")
    require_dp: bool = _rule(False, "train only with record-level differential privacy")
    max_epsilon_run: float = _rule(
        math.inf, "largest epsilon (at `delta`) one run may spend on the site's patients")
    max_epsilon_total: float = _rule(
        math.inf, "largest epsilon (at `delta`) all runs together may spend")
    delta: float = _rule(1e-5, "the delta at which the epsilons are stated; a run asking for "
                         "a larger delta is refused")
    path: Path | None = None

    def describe(self) -> list[str]:
        """What the policy allows, one line per rule, in words."""
        apps = ("any app bundle (no approved-apps: the site trusts the coordinator's code)"
                if not self.approved_apps else
                "app bundles with sha256 " + ", ".join(self.approved_apps))
        eps = [(self.max_epsilon_run, "per run"), (self.max_epsilon_total, "over all runs")]
        budget = "; ".join(f"epsilon {e:g} {what}" if math.isfinite(e) else f"no epsilon "
                           f"limit {what}" for e, what in eps)
        return [
            f"runs: {apps}",
            f"answers phases: {', '.join(self.phases) or 'none'}"
            + (f" (refuses {', '.join(p for p in PHASES if p not in self.phases)})"
               if set(self.phases) != set(PHASES) else ""),
            "aggregates: " + (f"each rests on at least {self.min_rows} rows"
                              if self.min_rows else "no minimum number of rows"),
            "training: " + (f"at most {self.max_rounds} rounds" if self.max_rounds
                            else "any number of rounds")
            + ("; only with record-level differential privacy (dp = \"record\")"
               if self.require_dp else "; with or without differential privacy"),
            f"privacy budget: {budget} (delta {self.delta:g})",
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

    def check_training(self, server_round: int, dp: str, epsilon: float, delta: float) -> None:
        """Refuse a training round the policy does not accept (rounds, DP, run budget).

        Raises
        ------
        PolicyRefusal
            With rule ``max-rounds``, ``require-dp``, ``max-epsilon-run`` or ``delta``.
        """
        if self.max_rounds and server_round > self.max_rounds:
            raise PolicyRefusal("max-rounds", f"round {server_round} is beyond the policy's "
                                f"max-rounds = {self.max_rounds}")
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



def admit(policy: Policy, phase: str, config: Mapping[str, Any],
          state: RecordDict | None = None) -> None:
    """Refuse a request the policy does not accept, before any data is read.

    Parameters
    ----------
    policy : Policy
        The site's policy.
    phase : str
        ``stats``, ``train``, ``adapt`` or ``evaluate``.
    config : mapping
        The message's config record (a training round's number and DP settings).
    state : RecordDict, optional
        The node's state in this run (``context.state``): the site counts the training
        rounds it admitted itself, so ``max-rounds`` does not rest on the round numbers the
        coordinator sends (every repeat's rounds count; a round that then fails counts too).

    Raises
    ------
    PolicyRefusal
        Naming the rule.
    """
    policy.allows(phase)
    if phase == "train":
        said = absolute_round(config)
        rnd = said if said is not None else 1
        admitted = _admitted(state) + 1
        policy.check_training(max(rnd, admitted), str(config.get("dp", "off")),
                              float(config.get("dp-epsilon", math.inf)),
                              float(config.get("dp-delta", 1.0)))
        if state is not None:
            state[TRAIN_COUNT] = ConfigRecord({"admitted": admitted})


TRAIN_COUNT = "fedadapt-training-rounds"


def _admitted(state: RecordDict | None) -> int:
    """Training rounds this site admitted so far in this run (0 without a state)."""
    if state is None or TRAIN_COUNT not in state.config_records:
        return 0
    count = state.config_records[TRAIN_COUNT].get("admitted", 0)
    return count if isinstance(count, int) else 0


def check_reply_rows(policy: Policy, reply: Message) -> None:
    """Refuse a reply holding a feature's count and sum over fewer than ``min-rows`` values.

    A feature observed in no row at all is sent as zeros, which say nothing about any row.

    Raises
    ------
    PolicyRefusal
        With rule ``min-rows``.
    """
    if not policy.min_rows or not reply.has_content():
        return
    for record in reply.content.metric_records.values():
        for key, value in record.items():
            if key.endswith(".count") and isinstance(value, list):
                low = [v for v in value if 0 < v < policy.min_rows]
                if low:
                    feature = key.removesuffix(".count")
                    policy.check_rows(f"the sum of feature {feature!r}", int(min(low)))


def read_policy(path: str | Path) -> Policy:
    """Read and check a site policy.

    Parameters
    ----------
    path : str or Path
        The TOML file.

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
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PolicyError(f"{path}: policy file not found") from None
    except IsADirectoryError:
        raise PolicyError(f"{path}: is a folder: name the policy file (TOML)") from None
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise PolicyError(f"{path}: cannot read the policy file ({why})") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is tolerated
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise PolicyError(f"{path}:{line}:{col}: not UTF-8 text: save the policy file as "
                          "UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        # Python 3.11's message ends "(at line L, column C)"; the position leads here.
        m = re.search(r"(.*) \(at line (\d+), column (\d+)\)", str(err))
        where, what = (f"{m.group(2)}:{m.group(3)}", m.group(1)) if m else ("1:1", str(err))
        raise PolicyError(f"{path}:{where}: invalid TOML: {what}") from None
    known = {f.name.replace("_", "-"): f for f in fields(Policy) if f.name != "path"}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        where = _where(path, text, key)
        if key not in known:
            what = "table" if isinstance(value, dict) else "key"
            raise PolicyError(f"{where}: unknown {what} {key!r}; known keys: "
                              f"{', '.join(known)}")
        values[known[key].name] = _value(where, key, value)
    policy = Policy(**values, path=path)
    for key, problem in _problems(policy):
        where = _where(path, text, key)
        bad = re.search(r"entry '([^']*)'", problem)  # an approved-apps entry: point at it
        if bad and bad.group(1):
            at = next(((i, line.index(bad.group(1))) for i, line in
                       enumerate(text.splitlines(), 1) if bad.group(1) in line), None)
            where = f"{path}:{at[0]}:{at[1] + 1}" if at else where
        raise PolicyError(f"{where}: {problem}")
    return policy


def _where(path: Path, text: str, key: str) -> str:
    """``file:line:column`` of ``key = ...`` (or a ``[key]`` table) in the file, else 1:1."""
    for i, line in enumerate(text.splitlines(), 1):
        m = re.match(rf"(\s*)(\[+\s*)?[\"']?{re.escape(key)}[\"']?\s*(=|\.|\])", line)
        if m:
            return f"{path}:{i}:{len(m.group(1)) + 1}"
    return f"{path}:1:1"


def _value(where: str, key: str, value: Any) -> Any:
    """The value of ``key`` in the policy's type, or a PolicyError saying what is expected."""
    if key in ("approved-apps", "phases"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(f"{where}: {key} must be a list of strings")
        return tuple(v.strip().lower() if key == "approved-apps" else v for v in value)
    if key == "require-dp":
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


def _problems(policy: Policy) -> list[tuple[str, str]]:
    """(key, problem) for values of the right type that still cannot be used."""
    problems = []
    bad_hashes = [h for h in policy.approved_apps if not HASH.fullmatch(h)]
    if bad_hashes:
        problems.append(("approved-apps", f"approved-apps entry {bad_hashes[0][:70]!r} is not "
                         "a sha256 hash (64 hex digits, as `fedadapt app-hash` prints them)"))
    unknown = [p for p in policy.phases if p not in PHASES]
    if unknown:
        problems.append(("phases", f"unknown phase(s) {unknown}; phases: {', '.join(PHASES)}"))
    for key in ("max_epsilon_run", "max_epsilon_total"):
        if not getattr(policy, key) > 0:
            problems.append((key.replace("_", "-"), f"{key.replace('_', '-')} must be positive"))
    if not 0 < policy.delta < 1:
        problems.append(("delta", "delta must be between 0 and 1"))
    return problems


def site_policy(site: SiteSettings, state: RecordDict | None = None) -> Policy:
    """The policy a site's settings name (``policy``), or :data:`NO_POLICY` when none.

    Parameters
    ----------
    site : SiteSettings
        The site.
    state : RecordDict, optional
        The node's state in this run (``context.state``): without a policy, the site says so
        once per run in its log, not on every message.

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
        return read_policy(pinned)
    if site.policy is not None:
        return read_policy(site.policy)
    if state is None or NO_POLICY_SAID not in state.config_records:
        log.info("no site policy (node_config policy=...): this site answers every phase of "
                 "any app, as the coordinator asks")
        if state is not None:
            state[NO_POLICY_SAID] = ConfigRecord({"said": True})
    return NO_POLICY


NO_POLICY_SAID = "fedadapt-no-policy-said"
