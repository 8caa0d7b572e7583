"""Drills on a site's private storage: tampered corrections, a folder that cannot be written."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from client.site import read_manifest, write_manifest
from drills.base import DrillResult, Engine, drill, federation, simulate_with_faults
from shared import protocol
from shared.settings import RunSettings

TAMPER = ("every tampered correction (flip-byte, truncate, foreign, wrong-key, other-model) is "
          "refused with its reason, none is partially applied (adapted metrics equal source "
          "metrics), each says so with one fallback; the clean control site is unaffected")
UNWRITABLE = ("a site whose folder cannot be created (under a regular file) and a site whose "
              "disk is full both fail in the stats phase, before training, with an error naming "
              "the folder as <site-dir> (its path stays at the site); the other sites complete")
# The reasons client.correction_store gives for each fault of drills.faulty_app.
REASONS = {
    "flip-byte": ("tampered",),
    "truncate": ("truncated", "tampered"),
    "foreign": ("foreign-site",),
    "wrong-key": ("wrong-key",),
    "other-model": ("other-source-model",),
}
METRICS = ("auc", "accuracy", "brier", "log_loss")
# hospital-a (glucose) is the clean control; hospital-c and -e have glucose too. The foreign
# site copies the next site's file: hospital-f gets the control's, which nobody tampers with.
CONTROL = "hospital-a"
FAULTS = {"hospital-b": "wrong-key", "hospital-c": "flip-byte", "hospital-d": "other-model",
          "hospital-e": "truncate", "hospital-f": "foreign"}
REFUSED = re.compile(r"^refused \(([^)]*)\)")
FOLDER_ERROR = re.compile(r"cannot (create|write)|No space left|bytes are free")


def _clear(*folders: Path) -> None:
    for folder in folders:
        if folder.exists():
            shutil.rmtree(folder)


@drill("correction-tamper", TAMPER, "simulation")
def correction_tamper(out: Path, engine: Engine = "simulation") -> DrillResult:
    """Six sites, five of which tamper with their stored correction before evaluating.

    The control is a glucose site (its correction is normally applied), and so are two of
    the tampered sites, so "not partially applied" is tested on corrections that were applied.

    Parameters
    ----------
    out : Path
        The drill's folder.
    engine : {"simulation", "in-process"}
        Where the runs happen (``drills.base.simulate_with_faults``).

    Returns
    -------
    DrillResult
        Figure: refused, correct_reason, partially_applied, applied_before_tamper (counts
        over the tampered sites).
    """
    run = out / "run"
    _clear(out / "data", run)
    manifest = federation(out, n_sites=6, faults=FAULTS)
    settings = RunSettings(num_server_rounds=3, record_replies=True)
    sites = simulate_with_faults(run, manifest, settings, engine=engine)["sites"]
    before = _adapt_status(run / "replies.jsonl")
    seen: dict[str, dict[str, Any]] = {}
    for name, fault in FAULTS.items():
        entry = sites.get(name, {})
        corr = entry.get("correction", {})
        status = str(corr.get("status", ""))
        match = REFUSED.match(status)
        reason = match.group(1) if match else ""
        metrics = entry.get("metrics", {})
        same = entry.get("status") == "ok" and all(
            metrics["adapted"][m] == metrics["source"][m] for m in METRICS)
        seen[name] = {"fault": fault, "reason": reason, "status": status,
                      "adapt_status": before.get(name, ""), "site_status": entry.get("status"),
                      "fallbacks": corr.get("fallbacks"),
                      "refused": bool(match) and corr.get("fallbacks") == 1,
                      "reason_ok": reason in REASONS[fault], "partial": not same}
    control = sites.get(CONTROL, {})
    control_status = str(control.get("correction", {}).get("status", ""))
    control_ok = (control.get("status") == "ok" and control["correction"].get("fallbacks") == 0
                  and (control_status == "applied" or control_status.startswith("not applied")))
    figure = {"refused": sum(s["refused"] for s in seen.values()),
              "correct_reason": sum(s["reason_ok"] for s in seen.values()),
              "partially_applied": sum(s["partial"] for s in seen.values()),
              "applied_before_tamper": sum(s["adapt_status"] == "applied"
                                           for s in seen.values())}
    passed = (figure["refused"] == figure["correct_reason"] == len(FAULTS)
              and figure["partially_applied"] == 0 and control_ok)
    reasons = ", ".join(f"{s['fault']}->{s['reason'] or '?'}" for s in seen.values())
    observed = (f"{figure['refused']}/{len(FAULTS)} tampered corrections refused with one "
                f"fallback, {figure['correct_reason']} with the expected reason ({reasons}), "
                f"{figure['partially_applied']} partially applied "
                f"({figure['applied_before_tamper']} had been applied before the tampering); "
                f"control {CONTROL}: {control_status or control.get('status')!r}")
    return DrillResult("correction-tamper", TAMPER, observed, passed, figure,
                       {"sites": seen, "control": control_status})


@contextlib.contextmanager
def full_disk(folder: Path) -> Iterator[str]:
    """Mount a 256 KiB tmpfs at ``folder`` and fill it; yield "" or why it could not be done.

    Parameters
    ----------
    folder : Path
        The mount point (created).

    Yields
    ------
    str
        Empty when the full disk is in place, otherwise the reason it is not.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        yield "mounting a tmpfs needs root"
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        yield f"mount -t tmpfs failed: {(done.stderr or done.stdout).strip()}"
        return
    try:
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
        finally:
            os.close(fd)
        yield ""
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def _adapt_status(replies: Path) -> dict[str, str]:
    """Site name -> correction status of its adapt reply (needs ``record-replies``)."""
    found = {}
    for line in replies.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        site = entry.get("configs", {}).get(protocol.SITE)
        if entry.get("type") == protocol.ADAPT and isinstance(site, dict):
            found[str(site[protocol.SITE_NAME])] = str(site[protocol.CORRECTION_STATUS])
    return found


def _stats_failures(replies: Path) -> dict[int, str]:
    """Node id -> error text of every failed stats reply in ``replies.jsonl``."""
    found = {}
    for line in replies.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("type") == protocol.STATS and "error" in entry:
            found[int(entry["node"])] = str(entry["error"])
    return found


@drill("unwritable-site", UNWRITABLE, "simulation")
def unwritable_site(out: Path, engine: Engine = "simulation") -> DrillResult:
    """Four sites: one's folder sits under a regular file, one's on a full tmpfs, two healthy.

    Parameters
    ----------
    out : Path
        The drill's folder (root is needed for the full-disk case; without it that case is
        reported as not run).
    engine : {"simulation", "in-process"}
        Where the runs happen (``drills.base.simulate_with_faults``).

    Returns
    -------
    DrillResult
        Figure: sites_failed_before_training, healthy_ok, full_disk_tested.
    """
    out = out.resolve()
    _clear(out / "data", out / "run", out / "blocker")
    manifest = federation(out, n_sites=4)
    (out / "blocker").write_text("a regular file, not a folder\n", encoding="utf-8")
    with full_disk(out / "full-disk") as not_run:
        broken = {"hospital-c": out / "blocker" / "site"}
        if not not_run:
            broken["hospital-d"] = out / "full-disk" / "site"
        write_manifest(manifest, "synthetic", [
            {"name": s.name, "data-file": s.data_file.name,
             "site-features": list(s.site_features), "site-dir": str(broken.get(s.name, ""))}
            for s in read_manifest(manifest).sites], comment="unwritable-site drill")
        report = simulate_with_faults(out / "run", manifest, RunSettings(num_server_rounds=2),
                                      faulty=False, engine=engine)
    stats_errors = _stats_failures(out / "run" / "replies.jsonl")
    trained = {int(json.loads(line)["node"]) for line in
               (out / "run" / "replies.jsonl").read_text(encoding="utf-8").splitlines()
               if json.loads(line).get("type") == protocol.TRAIN}
    failed = [str(e.get("error") or "") for e in report["sites"].values()
              if e["status"] == "failed"]
    checks: dict[str, dict[str, Any]] = {}
    for name, folder in broken.items():
        # The site names its folder <site-dir> in what it sends (its own log has the path).
        error = str(report["sites"].get(name, {}).get("error") or "")
        nodes = [n for n, err in stats_errors.items()
                 if err.startswith(f"[site {name}] ") and "<site-dir>" in err]
        checks[name] = {
            "reported": error.startswith("stats:") and "<site-dir>" in error
                        and str(folder) not in error and bool(FOLDER_ERROR.search(error)),
            "before_training": len(nodes) == 1 and nodes[0] not in trained,
            "error": error or "no error names the folder",
        }
    healthy = [s.name for s in read_manifest(manifest).sites if s.name not in broken]
    healthy_ok = sum(report["sites"].get(n, {}).get("status") == "ok" for n in healthy)
    figure = {"sites_failed_before_training": sum(c["reported"] and c["before_training"]
                                                  for c in checks.values()),
              "healthy_ok": healthy_ok, "full_disk_tested": int(not not_run)}
    passed = (figure["sites_failed_before_training"] == len(broken)
              and healthy_ok == len(healthy) and len(failed) == len(broken))
    observed = (f"{figure['sites_failed_before_training']}/{len(broken)} broken site folders "
                f"failed in stats before training, {healthy_ok}/{len(healthy)} healthy sites "
                "ok; full disk " + ("tested" if not not_run else f"not run ({not_run})"))
    details: dict[str, Any] = {"sites": checks}
    if not_run:
        details["full_disk"] = f"not run: {not_run}"
    return DrillResult("unwritable-site", UNWRITABLE, observed, passed, figure, details)
