"""A run's status from its folder: phase, round, loss, and each site's replies, as one dict.

What ``fedadapt status`` shows (``server.status_page``), read from the files the ServerApp
writes as it goes: ``events.jsonl`` (phases, rounds, losses, the sites' names, the end),
``replies.jsonl`` (per reply: its site, type, size, time, or the error; never a value is read
from it) and, once the run is done, ``report.json``. Aggregates and identifiers only: the
same the coordinator already holds, no patient data.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from server.summary import REFUSAL

# The phases a run goes through, in order (the status says which one is running).
PHASES = ("waiting", "stats", "train", "groups", "adapt", "evaluate", "finished")


def _lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` that parse (a line being written is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def run_status(out: Path, now: float | None = None) -> dict[str, Any]:
    """The status of the run whose output folder is ``out``.

    Parameters
    ----------
    out : Path
        The run's ``--out`` folder (the ServerApp's ``out``).
    now : float, optional
        The current time (seconds since the epoch), for "last seen ... ago".

    Returns
    -------
    dict
        ``state`` (``not started``, ``running``, ``finished``, ``failed`` or ``stopped``),
        ``phase``, ``round``, ``rounds``, ``losses`` (per round), ``error``, ``sites`` (per
        site: ``node``, ``last_seen_s``, ``phase``, ``round``, ``replies``, ``bytes``,
        ``errors``, ``refusals`` with their rules, ``epsilon``) and ``report`` (the report's
        summary, once written).
    """
    now = time.time() if now is None else now
    events = _lines(out / "events.jsonl")
    status: dict[str, Any] = {"state": "not started" if not events else "running",
                              "phase": None, "round": None, "rounds": None, "losses": [],
                              "error": None, "sites": {}, "report": None}
    names: dict[str, str] = {}
    epsilon: dict[str, float] = {}
    for e in events:
        kind = e.get("event")
        if kind == "phase":
            status["phase"] = e.get("phase")
        elif kind == "waiting":
            status["phase"] = "waiting"
        elif kind == "round":
            status["round"], status["rounds"] = e.get("round"), e.get("rounds")
            loss = e.get("loss")
            status["losses"].append({"round": e.get("round"), "loss": loss if isinstance(
                loss, int | float) and math.isfinite(loss) else None})
            epsilon.update(e.get("epsilon") or {})
        elif kind == "sites-named":
            names.update(e.get("names") or {})
        elif kind in ("finished", "failed", "stopped"):
            status["state"] = kind
            status["error"] = e.get("error")
            if kind == "finished":
                status["phase"] = "finished"
    report_file = out / "report.json"
    report = None
    if status["state"] == "finished" and report_file.is_file():
        try:
            report = json.loads(report_file.read_text(encoding="utf-8"))
        except ValueError:
            report = None
    if report is not None:  # the report names every site's node (a run before the event)
        names.update({str(s.get("node_id")): n for n, s in (report.get("sites") or {}).items()
                      if s.get("node_id") is not None and str(s.get("node_id")) not in names})
        status["report"] = _summary(report)
    status["sites"] = _sites(out, names, epsilon, now)
    return status


def _sites(out: Path, names: dict[str, str], epsilon: dict[str, float], now: float
           ) -> dict[str, dict[str, Any]]:
    """Per site (by name where the stats phase told it): what its replies say."""
    sites: dict[str, dict[str, Any]] = {}
    for reply in _lines(out / "replies.jsonl"):
        node = reply.get("node")
        name = names.get(str(node), f"node {node}")
        site = sites.setdefault(name, {"node": node, "last_seen_s": None, "phase": None,
                                       "round": None, "replies": 0, "bytes": 0, "errors": 0,
                                       "refusals": [], "epsilon": None})
        site["replies"] += 1
        site["bytes"] += int(reply.get("bytes") or 0)
        when = reply.get("time")
        if isinstance(when, int | float):
            site["last_seen_s"] = round(max(0.0, now - when), 1)
        site["phase"] = _phase(str(reply.get("type", "")), reply)
        if reply.get("round") is not None:
            site["round"] = reply.get("round")
        error = reply.get("error")
        if error:
            site["errors"] += 1
            refused = REFUSAL.search(str(error))
            if refused and refused.group(1) not in site["refusals"]:
                site["refusals"].append(refused.group(1))
    for name, site in sites.items():
        site["epsilon"] = epsilon.get(name)
    return dict(sorted(sites.items()))


def _phase(kind: str, reply: dict[str, Any]) -> str:
    """The phase a reply answered, from its message type (a secure sum: its stage too)."""
    if kind.endswith("secagg"):
        return f"secure sum ({reply.get('secagg', '?')})"
    return {"train": "train", "evaluate": "evaluate"}.get(kind, kind.rsplit(".", 1)[-1])


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a finished run's report: per site AUCs and its model."""
    rows = []
    for name, site in (report.get("sites") or {}).items():
        metrics = site.get("metrics") or {}
        rows.append({"site": name, "status": site.get("status"),
                     "model": (site.get("model") or {}).get("choice"),
                     **{m: (metrics.get(m) or {}).get("auc")
                        for m in ("local", "source", "adapted")}})
    return {"sites": rows, "notes": list(report.get("notes") or []),
            "converged_rounds": report.get("converged_rounds")}
