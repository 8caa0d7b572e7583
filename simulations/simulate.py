"""``fedadapt simulate``: the whole pipeline over virtual sites, with the pooled reference."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from deploy.processes import EventHook
from server.report import mark_incomplete, remove_report, write_report
from server.summary import method_metrics, summarize_methods
from shared.settings import RunSettings
from simulations.datasets import sites_for_run
from simulations.generator import ROLES
from simulations.oracle import oracle_reference
from simulations.pooled import pooled_reference
from simulations.ray_cluster import RayCluster, attach
from simulations.superlink import run_app

log = logging.getLogger(__name__)


def simulate(
    data: str,
    out: Path,
    settings: RunSettings,
    *,
    n_sites: int = ROLES,
    on_event: EventHook | None = None,
    timeout: float = 3600.0,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run stats, federated training, private corrections and evaluation over virtual sites.

    Parameters
    ----------
    data : str
        ``synthetic``, ``heart:DIR`` or a folder with a sites manifest.
    out : Path
        Output folder (report.json, report.md, plots, logs, generated data, site folders).
    settings : RunSettings
        Run settings; ``sites-manifest``, ``schema``, ``expected-sites`` and ``out`` are set here.
    n_sites : int
        Number of generated hospitals for ``synthetic``.
    on_event : callable, optional
        Progress callback (ServerApp events, then ``{"event": "pooled"}``).
    timeout : float
        Bound on the Flower run, in seconds.
    ray_address : str, optional
        ``HOST:PORT`` of the head of a running Ray cluster to run the virtual sites on,
        checked before anything starts and recorded as ``config.ray-cluster``; by default
        the simulation starts (and stops) a Ray instance of its own on this machine.

    Returns
    -------
    dict
        The report, with the pooled reference added.
    """
    out = out.resolve()
    # The cluster is where the simulation runs, not part of the federated run: not a run
    # setting (shared.settings.RunSettings), never sent to the ServerApp or the sites.
    cluster = attach(ray_address) if ray_address is not None else None
    manifest = sites_for_run(data, out, n_sites, settings)
    settings = replace(
        settings, sites_manifest=str(manifest.path.resolve()), schema=manifest.schema,
        expected_sites=len(manifest.sites), out=str(out),
        max_in_flight=settings.max_in_flight or simulation_window(cluster),
    )
    remove_report(out)  # an earlier run's report must not pass for this one's
    set_aside_other_sites(out, [site.name for site in manifest.sites])
    try:
        report = run_app(settings.to_run_config(), len(manifest.sites), out,
                         on_event=on_event, timeout=timeout,
                         ray_address=cluster.address if cluster else None)
        if on_event is not None:
            on_event({"event": "pooled"})
        ok = [name for name, entry in report["sites"].items() if entry["status"] == "ok"]
        pooled, skipped = pooled_reference(manifest, settings, ok)
        add_pooled(report, pooled)
        add_reference(report, "oracle", oracle_reference(manifest, settings, ok))
        if skipped:
            report.setdefault("notes", []).append(
                f"pooled reference without {', '.join(skipped)} (not usable in the run)")
        report["config"]["data"] = data
        if cluster is not None:
            report["config"]["ray-cluster"] = cluster.as_dict()
        write_report(report, out)
    except BaseException:
        mark_incomplete(out)
        raise
    return report


# Messages out at once per CPU of the engine: its ClientApp actors (one per CPU) need a few
# queued each; Flower's in-memory link state scans every waiting message for every virtual
# site on each pass, so with every message of 1,000 sites out at once the simulation process
# does little else and the ClientApps starve (the scale part, docs/benchmarks.md).
WINDOW_PER_CPU = 8


def simulation_window(cluster: RayCluster | None = None) -> int:
    """``max-in-flight`` for the simulation engine: 8 messages per CPU it runs sites on."""
    cpus = cluster.cpus if cluster is not None else (os.cpu_count() or 1)
    return max(2, int(WINDOW_PER_CPU * cpus))


def add_reference(report: dict[str, Any], method: str,
                  values: dict[str, list[dict[str, Any]]]) -> None:
    """Add a reference computed outside the federation (``pooled``, ``oracle``) to the sites."""
    for name, entry in report["sites"].items():
        if entry["status"] == "ok" and values.get(name):
            entry["metrics"][method] = method_metrics(values[name], method)
    report["summary"] = {**report.get("summary", {}), **summarize_methods(report["sites"])}


def add_pooled(report: dict[str, Any], pooled: dict[str, list[dict[str, Any]]]) -> None:
    """Add the central reference to every site's metrics and to the summary."""
    for name, entry in report["sites"].items():
        if entry["status"] == "ok" and pooled.get(name):
            entry["metrics"]["pooled"] = method_metrics(pooled[name], "pooled")
    summary = summarize_methods(report["sites"])
    methods = summary["methods"]
    if "source" in methods and "pooled" in methods:
        fed, central = methods["source"]["log_loss"], methods["pooled"]["log_loss"]
        summary["federated_vs_pooled"] = {
            "source_log_loss": fed,
            "pooled_log_loss": central,
            "difference": fed - central if fed is not None and central is not None else None,
        }
    report["summary"] = {**report.get("summary", {}), **summary}


def set_aside_other_sites(out: Path, names: list[str]) -> list[str]:
    """Move the folders of sites not in this run from ``OUT/sites`` to ``OUT/earlier-sites``.

    A second run into the same ``--out`` with other sites would otherwise leave the first
    run's site folders (keys, corrections, audit logs) beside this run's, as if its own;
    nothing is deleted. Returns the names moved.
    """
    sites = out / "sites"
    if not sites.is_dir():
        return []
    moved = []
    for folder in sorted(p for p in sites.iterdir() if p.is_dir() and p.name not in names):
        target = out / "earlier-sites" / folder.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            target = target.with_name(f"{folder.name}-{int(time.time())}")
        folder.rename(target)
        moved.append(folder.name)
    if moved:
        log.warning("%s held the folders of %d site(s) not in this run (%s): moved to %s",
                    sites, len(moved), ", ".join(moved), out / "earlier-sites")
    return moved
