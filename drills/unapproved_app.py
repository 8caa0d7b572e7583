"""Drill: the coordinator ships an app bundle the sites' policy does not approve.

A real TLS deployment (``deploy.local``) whose sites run only approved bundles
(``--isolation process`` + ``fedadapt site-exec --policy``, :mod:`executor.approved_app`). The
approved bundle is a copy of this project with two lines added to ``client/client_app.py``:
one writes a marker ``imported`` whenever the module is imported, the other would write a
marker ``unapproved-ran`` but is switched off (``if 0:``); the unapproved bundle differs from
it in ONE byte (``if 1:``). The unapproved run must be refused at every site with its hash,
with no shipped code run (no marker at all, nothing installed under the site's
``FLWR_HOME/apps``); the approved run then completes in the same federation, running the
bundle's own code (``imported`` written).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from client.site import read_manifest
from deploy.local import (
    CONNECTION,
    coordinator,
    register_site,
    start_checked_supernode,
    supernode_command,
)
from deploy.processes import APP_DIR, FlowerRunError, flower_bin, submit_run
from drills.base import DrillResult, drill, federation
from executor.approved_app import bundle_hash
from shared.settings import RunSettings

EXPECTED = ("an app bundle one byte away from the approved one is refused at every site "
            "before any of it runs: each site's log and the run's error name its sha256, no "
            "shipped code ran (no marker file, nothing installed); the approved bundle then "
            "runs in the same federation")
# What the bundle's code (the project's files) is, as the FAB takes it (fab-include).
APP_FILES = ("pyproject.toml", ".gitignore", "shared", "server", "client")


def app_copy(folder: Path, markers: Path, on: bool) -> Path:
    """A copy of this Flower app whose ClientApp module writes markers in ``markers`` on import.

    ``imported`` always; ``unapproved-ran`` only if ``on``: the two variants differ in exactly
    one byte (``if 0:`` / ``if 1:``).
    """
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in APP_FILES:
        src = APP_DIR / name
        if src.is_dir():
            shutil.copytree(src, folder / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, folder / name)
    module = folder / "client" / "client_app.py"
    lines = (f'\n__import__("pathlib").Path({str(markers / "imported")!r}).write_text("ran")\n'
             f'if {int(on)}: __import__("pathlib").Path({str(markers / "unapproved-ran")!r})'
             '.write_text("ran")\n')
    module.write_text(module.read_text(encoding="utf-8") + lines, encoding="utf-8")
    return folder


def _listed_runs(env: dict[str, str]) -> list[dict[str, Any]]:
    """``flwr ls --format json``: the runs the SuperLink recorded (with their fab hash)."""
    result = subprocess.run([flower_bin("flwr"), "ls", CONNECTION, "--format", "json"],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    try:
        runs = json.loads(result.stdout[result.stdout.find("{"):]).get("runs", [])
    except ValueError:
        return []
    return [r for r in runs if isinstance(r, dict)]


def approved_app_run(out: Path, *, n_sites: int = 2, run_approved: bool = True,
                     rounds: int = 2) -> dict[str, Any]:
    """Deploy ``n_sites`` checked sites; submit the unapproved bundle, then the approved one.

    Returns
    -------
    dict
        What was observed: both hashes, the unapproved run's error, each site's log lines
        naming the hash, the marker, the sites' installed apps, the approved run's report.
    """
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    markers = out / "markers"
    markers.mkdir()
    approved_dir = app_copy(out / "apps" / "approved" / "fedadapt", markers, on=False)
    unapproved_dir = app_copy(out / "apps" / "unapproved" / "fedadapt", markers, on=True)
    approved, unapproved = bundle_hash(approved_dir), bundle_hash(unapproved_dir)
    policy = out / "site-policy.toml"
    policy.write_text(f'# the app bundles this site runs (fedadapt app-hash)\n'
                      f'approved-apps = ["{approved}"]\n', encoding="utf-8")
    manifest = read_manifest(federation(out, n_sites=n_sites, seed=7))
    names = [s.name for s in manifest.sites]
    settings = RunSettings(num_server_rounds=rounds, expected_sites=n_sites, min_sites=n_sites,
                           strategy="fedavg", node_wait_timeout=120.0, reply_timeout=120.0,
                           dp="record")  # the policy's other keys: the deployment's defaults
    run_config = {**settings.to_run_config(), "sites-manifest": str(manifest.path),
                  "schema": manifest.schema}
    seen: dict[str, Any] = {"approved_hash": approved, "unapproved_hash": unapproved}
    with coordinator(out / "deployment", names) as dep:
        for name in names:
            register_site(dep, name)
        for site in manifest.sites:
            site_dir = out / "sites" / site.name
            start_checked_supernode(dep, site.name, supernode_command(
                dep, site.name, data_file=site.data_file, site_dir=site_dir,
                site_features=list(site.site_features)), site_dir, policy)
        try:
            submit_run(dep.env, CONNECTION, run_config, out / "unapproved-run", timeout=600,
                       app_dir=unapproved_dir)
            seen["unapproved_error"] = ""
        except FlowerRunError as err:
            seen["unapproved_error"] = str(err)
        seen["installed_after_unapproved"] = _installed(out, names)
        seen["markers_after_unapproved"] = sorted(p.name for p in markers.iterdir())
        if run_approved:
            try:
                seen["report"] = submit_run(dep.env, CONNECTION, run_config,
                                            out / "approved-run", timeout=900,
                                            app_dir=approved_dir)
            except FlowerRunError as err:
                seen["approved_error"] = str(err)
        seen["runs"] = _listed_runs(dep.env)
        logs = {name: dep.logs[f"{name}-exec"] for name in names}
    seen["site_logs"] = {name: [line for line in path.read_text(errors="replace").splitlines()
                                if unapproved in line and "refused" in line]
                         for name, path in logs.items()}
    seen["markers"] = sorted(p.name for p in markers.iterdir())
    seen["installed"] = _installed(out, names)
    return seen


def _installed(out: Path, names: list[str]) -> dict[str, list[str]]:
    """The app folders each site's Flower unpacked (``FLWR_HOME/apps``)."""
    return {name: sorted(p.name for p in (out / "sites" / name / ".flwr" / "apps").glob("*"))
            if (out / "sites" / name / ".flwr" / "apps").is_dir() else [] for name in names}


def refused_everywhere(seen: dict[str, Any]) -> dict[str, bool]:
    """The drill's conditions, each true or false."""
    bad = seen["unapproved_hash"]
    error = seen["unapproved_error"]
    sites = seen["site_logs"]
    report = seen.get("report") or {}
    return {
        "run_refused": "no site passed the stats phase" in error,
        "hash_in_run_error": error.count(f"app bundle sha256 {bad} is not approved")
        >= len(sites),
        "hash_in_every_site_log": all(lines for lines in sites.values()),
        "no_shipped_code_ran": not seen["markers_after_unapproved"]
        and "unapproved-ran" not in seen["markers"],
        "superlink_recorded_hash": bad in {r.get("fab-hash") for r in seen.get("runs", [])},
        "nothing_installed": not any(seen["installed_after_unapproved"].values())
        and not any(bad[:8] in p for ps in seen["installed"].values() for p in ps),
        # The approved bundle ran, its own code (not the site's installed copy of the app).
        "approved_ran": bool(report.get("rounds")) and "imported" in seen["markers"]
        if "report" in seen or "approved_error" in seen else True,
    }


@drill("unapproved-app", EXPECTED, "processes")
def unapproved_app(out: Path) -> DrillResult:
    """Two TLS sites with approved-apps; one-byte-changed bundle, then the approved one."""
    seen = approved_app_run(out)
    checks = refused_everywhere(seen)
    bad = seen["unapproved_hash"]
    report = seen.get("report") or {}
    observed = (
        f"unapproved bundle sha256 {bad[:12]}...: "
        + ("refused at every site" if checks["run_refused"] else "NOT refused")
        + f" (sites logging the hash: {sum(bool(v) for v in seen['site_logs'].values())}/"
        f"{len(seen['site_logs'])}); "
        + ("no shipped code ran, nothing installed" if checks["no_shipped_code_ran"]
           and checks["nothing_installed"] else "shipped code ran or was installed")
        + f"; approved bundle {seen['approved_hash'][:12]}...: "
        + (f"ran {len(report.get('rounds', []))} round(s)" if report
           else f"failed: {seen.get('approved_error', '')[:200]}"))
    return DrillResult(
        "unapproved-app", "", observed, all(checks.values()),
        {"sites": len(seen["site_logs"]), "refusing_sites": sum(
            bool(v) for v in seen["site_logs"].values()),
         "markers_written": seen["markers"], "approved_rounds": len(report.get("rounds", []))},
        {"checks": checks, "unapproved_hash": bad, "approved_hash": seen["approved_hash"],
         "unapproved_error": seen["unapproved_error"][:2000], "site_logs": seen["site_logs"],
         "installed": seen["installed"], "runs": seen.get("runs")},
    )
