"""A site's ledger of what it has given: training rounds and privacy budget, failing closed.

``site-dir/privacy-ledger.json`` (0600, written atomically, one update at a time) holds the
training rounds the site took part in over all runs, and the epsilon spent per run and per
noisy release (``client.privacy``). Every update raises the ledger's ``sequence`` and is
recorded, whole, as a ``ledger`` event in the site's hash-chained audit log
(``client.audit_log``). The ledger is checked against that record before every use:

- missing while the audit log records a ledger: refused (a deleted ledger must not reset the
  budget);
- older than the audit log's last record (a restored copy): refused;
- unreadable: refused.

Until the operator runs ``fedadapt reset-ledger``, which verifies the audit log's chain and
restores the ledger from its last record (an audited event itself), the site refuses every
request that would charge the ledger. Runs compose by basic composition (epsilons and deltas
add up).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.policy import PolicyRefusal
from shared.files import ensure_private_dir, write_atomically

log = logging.getLogger(__name__)

LEDGER = "privacy-ledger.json"
VERSION = 2
EVENT = "ledger"
RESET_EVENT = "ledger-reset"
RULE = "ledger"


def ledger_path(site_dir: str | Path) -> Path:
    """Where a site's ledger lives (``site_dir / "privacy-ledger.json"``)."""
    return Path(site_dir) / LEDGER


def empty() -> dict[str, Any]:
    """A ledger with nothing spent."""
    return {"version": VERSION, "sequence": 0, "rounds": 0, "runs": {}, "releases": {},
            "total-epsilon": 0.0, "total-delta": 0.0}


class LedgerRefused(PolicyRefusal):
    """The ledger cannot be trusted (missing, rolled back, unreadable): nothing is charged."""

    def __init__(self, message: str) -> None:
        super().__init__(RULE, message)


def recorded_sequence(site_dir: str | Path) -> tuple[int, dict[str, Any] | None]:
    """The last ledger ``sequence`` and state the audit log records (0 and None if none)."""
    from client.audit_log import audit_path

    path = audit_path(site_dir)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return 0, None
    for line in reversed(lines):
        if b'"event":"ledger"' not in line:  # skip the replies without parsing them
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == EVENT and isinstance(entry.get("state"), dict):
            return int(entry.get("sequence", 0)), entry["state"]
    return 0, None


def read(site_dir: str | Path) -> dict[str, Any]:
    """The site's ledger, checked against the audit log's record of it.

    Raises
    ------
    LedgerRefused
        If the ledger is missing while the audit log records one, older than that record,
        or unreadable.
    """
    path = ledger_path(site_dir)
    recorded, _ = recorded_sequence(site_dir)
    advice = ("the site refuses until its operator restores it: `fedadapt reset-ledger "
              "--site-dir DIR` rebuilds it from the audit log")
    try:
        ledger = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if recorded:
            log.error("the privacy ledger %s is missing, but the audit log records ledger "
                      "update %d", path, recorded)
            raise LedgerRefused("the site's ledger is missing while its audit log records "
                                f"spending; {advice}") from None
        return empty()
    except (OSError, ValueError):
        raise LedgerRefused(f"the site's ledger is unreadable; {advice}") from None
    if not isinstance(ledger, dict) or not isinstance(ledger.get("runs"), dict):
        raise LedgerRefused(f"the site's ledger is damaged; {advice}")
    ledger = {**empty(), **ledger}
    if int(ledger.get("sequence", 0)) < recorded:
        log.error("the privacy ledger %s is at update %s, the audit log records update %d: "
                  "an older copy was restored", path, ledger.get("sequence"), recorded)
        raise LedgerRefused(f"the site's ledger is older than its audit log's record of it "
                            f"(rolled back); {advice}")
    return ledger


@contextlib.contextmanager
def _locked(site_dir: str | Path) -> Iterator[None]:
    """One ledger update at a time in this site's folder (read, check, write)."""
    ensure_private_dir(site_dir)
    with (Path(site_dir) / f".{LEDGER}.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def update(site_dir: str | Path, change: str) -> Iterator[dict[str, Any]]:
    """Read the ledger, let the caller change it, then write it and record it in the audit log.

    The ledger is written first and the audit event second: a crash between them leaves the
    ledger ahead of its record, which is accepted; the other order would refuse a sound
    ledger. An exception inside the block (a refusal) writes nothing.

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.
    change : str
        What the update is, in words, for the audit event.

    Yields
    ------
    dict
        The ledger, to be changed in place.
    """
    from client.audit_log import record_event

    with _locked(site_dir):
        ledger = read(site_dir)
        yield ledger
        ledger["version"] = VERSION
        ledger["sequence"] = int(ledger.get("sequence", 0)) + 1
        ledger["total-epsilon"] = total_epsilon(ledger)
        ledger["total-delta"] = float(
            sum(float(r.get("delta", 0.0)) for r in ledger["runs"].values())
            + sum(float(r.get("delta", 0.0)) for r in ledger["releases"].values()))
        write_atomically(ledger_path(site_dir), json.dumps(ledger, indent=1).encode("utf-8"),
                         mode=0o600)
        record_event(site_dir, EVENT, sequence=ledger["sequence"], change=change,
                     state=ledger)


def total_epsilon(ledger: dict[str, Any], except_run: str | None = None) -> float:
    """Epsilon of every run but ``except_run`` and every release (basic composition)."""
    return float(sum(float(r.get("epsilon", 0.0)) for k, r in ledger["runs"].items()
                     if k != except_run)
                 + sum(float(r.get("epsilon", 0.0)) for r in ledger["releases"].values()))


def reset(site_dir: str | Path) -> dict[str, Any]:
    """Restore the ledger from the audit log's last record of it (an operator's command).

    The audit log's hash chain must be intact: a ledger rebuilt from an edited log would be
    whatever the editor wanted. The reset is itself an audited event.

    Returns
    -------
    dict
        The restored ledger.

    Raises
    ------
    ValueError
        If the audit log is missing or its chain is broken (the message says where).
    """
    from client.audit_log import audit_path, record_event, verify_chain

    if not audit_path(site_dir).is_file():
        raise ValueError(f"{audit_path(site_dir)}: no audit log to restore the ledger from")
    check = verify_chain(site_dir)
    if not check.ok:
        raise ValueError(f"{audit_path(site_dir)}:{check.line}: {check.reason}; the ledger "
                         "cannot be restored from a broken audit log: restore the audit log "
                         "from a backup first")
    with _locked(site_dir):
        sequence, state = recorded_sequence(site_dir)
        ledger = {**empty(), **(state or {})}
        ledger["sequence"] = max(sequence, int(ledger.get("sequence", 0))) + 1
        write_atomically(ledger_path(site_dir), json.dumps(ledger, indent=1).encode("utf-8"),
                         mode=0o600)
        record_event(site_dir, RESET_EVENT, sequence=ledger["sequence"],
                     restored_from=sequence, rounds=ledger["rounds"],
                     total_epsilon=ledger["total-epsilon"])
        record_event(site_dir, EVENT, sequence=ledger["sequence"], change="reset",
                     state=ledger)
    log.warning("privacy ledger of %s restored from audit record %d", site_dir, sequence)
    return ledger


def count_round(site_dir: str | Path, check: Any) -> int:
    """Count one more training round of the site, after ``check(rounds_with_this_one)``.

    ``check`` raises to refuse the round; nothing is counted then.

    Returns
    -------
    int
        The rounds the site has taken part in, this one included.
    """
    with update(site_dir, "training round admitted") as ledger:
        rounds = int(ledger.get("rounds", 0)) + 1
        check(rounds)
        ledger["rounds"] = rounds
    return rounds
