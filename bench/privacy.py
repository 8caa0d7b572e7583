"""Utility against privacy: adapted and source AUC per site at several epsilons, and without DP.

Every (epsilon, split) pair is one whole federated run (the real ServerApp logic over the
sites' real ClientApp, in this process: ``simulations.inprocess``), with its own site folders,
so each run spends its own budget at each site. Nothing is tuned on held-out rows: the same
settings run at every epsilon, with the same training strategy (the one DP runs use: with
``strategy = "auto"``, FedAvg); only ``dp`` and ``dp-epsilon`` change.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.options import EPSILONS
from client.client_app import app as client_app
from client.site import read_manifest
from server.assessment import paired_interval
from server.federation import run_federation
from server.progress import Progress
from server.report.plots import _new_figure, _save_figure
from shared.metrics import mean_sd
from shared.settings import RunSettings
from simulations.datasets import prepare_data
from simulations.inprocess import InProcessGrid, manifest_contexts

log = logging.getLogger(__name__)

METHODS = ("adapted", "source")


def _site_figures(report: dict[str, Any], sites: Path) -> dict[str, dict[str, Any]]:
    """Per site: held-out AUC of the adapted and source models, and the epsilon it spent.

    A site that answers only under DP keeps its results in its folder (``sites``/NAME): this
    benchmark owns every site, so it reads them there.
    """
    from client.results import read_results

    out: dict[str, dict[str, Any]] = {}
    for name, site in report["sites"].items():
        metrics = site.get("metrics") or {}
        dp = site.get("dp") or {}
        aucs = {m: (metrics.get(m) or {}).get("auc") for m in METHODS}
        n_train, n_test = site.get("n_train", 0), site.get("n_test", 0)
        kept = read_results(sites / name) if site.get("status") == "withheld" else []
        if kept:
            m = kept[-1].metrics
            aucs = {k: m.get(f"{k}.auc") for k in METHODS}
            n_train, n_test = int(m.get("n-train") or 0), int(m.get("n-test") or 0)
        out[name] = {**aucs, "epsilon": dp.get("epsilon"), "status": site.get("status"),
                     "n_train": n_train, "n_test": n_test, "stopped": bool(dp.get("stopped"))}
    return out


def utility_vs_privacy(
    data: str, out: Path, settings: RunSettings, *, splits: int = 20,
    epsilons: Sequence[float] = EPSILONS, stats_dp: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every split without DP and at every epsilon; summarise AUC and epsilon per site.

    Parameters
    ----------
    data : str
        ``heart:DIR``, ``synthetic`` or a folder with a sites manifest.
    out : Path
        Working folder (one sub-folder per run: site folders and ledgers, events).
    settings : RunSettings
        Settings of every run (``seed`` is the first split's; ``dp``, ``dp-epsilon`` set here).
    splits : int
        Seeded train/held-out splits (seed, seed + 1, ...), each a run of its own.
    epsilons : sequence of float
        The per-run budgets to compare with the run without DP.
    stats_dp : bool
        Also run each epsilon at sites whose policy requires DP (``EPS+stats``): their stats
        released once with noise (``stats-epsilon``, the policy's default), the shared
        preprocessing fitted on those, as a deployed site's default policy has it.
    progress : callable, optional
        Told one line per finished run.

    Returns
    -------
    dict
        ``levels`` (``"none"`` and each epsilon) with per site the mean and sd of each AUC
        over the splits, the epsilon spent (mean and max), the runs in which the site stopped
        early; and ``runs``: every run's figures.
    """
    manifest = read_manifest(prepare_data(data, out / "data", 4, settings.seed).path)
    # Every level trains with the strategy DP runs use (auto: FedAvg under DP), so the columns
    # differ by DP alone, not by how the source model is trained.
    strategy = replace(settings, dp="record").training
    settings = replace(settings, strategy=strategy)
    levels: list[tuple[str, float | None]] = [("none", None)]
    for e in epsilons:
        levels += [(f"{e:g}", e)] + ([(f"{e:g}+stats", e)] if stats_dp else [])
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in levels}
    for k in range(splits):
        for label, eps in levels:
            run_dir = out / "runs" / f"eps-{label}" / f"split-{k:02d}"
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a fresh site folder: an empty privacy ledger
            run = replace(settings, seed=settings.seed + k, repeats=1,
                          dp="off" if eps is None else "record",
                          dp_epsilon=settings.dp_epsilon if eps is None else eps,
                          sites_manifest=str(manifest.path), schema=manifest.schema,
                          expected_sites=len(manifest.sites), out=str(run_dir),
                          node_wait_timeout=5.0)
            contexts = manifest_contexts(manifest, run_dir, run.to_run_config())
            if label.endswith("+stats"):
                policy = run_dir / "policy.toml"
                run_dir.mkdir(parents=True, exist_ok=True)
                policy.write_text(f"require-dp = true\nmax-epsilon-run = {eps}\n"
                                  f"max-epsilon-total = {2 * (eps or 0) + 10}\n",
                                  encoding="utf-8")
                for context in contexts.values():
                    context.node_config = {**context.node_config, "policy": str(policy)}
            grid = InProcessGrid(contexts, client_app, run_id=1000 + k)
            report = run_federation(grid, run, Progress(run_dir), {"privacy-level": label})
            runs[label].append(_site_figures(report, run_dir / "sites"))
            if progress is not None:
                progress(f"split {k + 1}/{splits}, epsilon {label}: done")
    names = [s.name for s in manifest.sites]
    summary: dict[str, Any] = {}
    for label, eps in levels:
        per_site = {}
        for name in names:
            figs = [r[name] for r in runs[label] if name in r]
            entry: dict[str, Any] = {}
            for m in METHODS:
                mean, sd, n = mean_sd([f[m] if f[m] is not None else math.nan for f in figs])
                entry[m] = {"mean": mean, "sd": sd, "n": n}
            spent = [f["epsilon"] for f in figs if f["epsilon"] is not None]
            entry["epsilon_mean"] = float(np.mean(spent)) if spent else None
            entry["epsilon_max"] = float(np.max(spent)) if spent else None
            entry["stopped_runs"] = sum(f["stopped"] for f in figs)
            if eps is not None:
                entry["vs_no_dp"] = {m: _paired(runs["none"], runs[label], name, m)
                                     for m in METHODS}
            per_site[name] = entry
        summary[label] = {"target_epsilon": eps, "sites": per_site}
    return {"data": data, "splits": splits, "epsilons": list(epsilons),
            "delta": settings.dp_delta, "clip": settings.dp_clip,
            "rounds": settings.num_server_rounds, "strategy": settings.training,
            "levels": summary, "runs": runs}


def _paired(base: list[dict[str, Any]], level: list[dict[str, Any]], name: str,
            method: str) -> dict[str, Any]:
    """AUC at a DP level minus without DP, split by split, with the corrected t interval.

    The same splits run at every level, so the differences are paired; they share training
    rows across splits, hence ``server.assessment.paired_interval``'s corrected resampled t.
    """
    values = []
    sizes = []
    for b, lv in zip(base, level, strict=True):
        x, y = lv.get(name, {}).get(method), b.get(name, {}).get(method)
        if x is not None and y is not None and math.isfinite(x) and math.isfinite(y):
            values.append({f"diff.dp-none.{method}.auc": float(x - y)})  # key of a - b
            sizes.append((b[name]["n_train"], b[name]["n_test"]))
    if not sizes:
        return {"difference": None, "low": None, "high": None, "splits": 0}
    return paired_interval(values, "dp", f"none.{method}", int(np.mean([s[0] for s in sizes])),
                           int(np.mean([s[1] for s in sizes])))


def _cell(entry: dict[str, Any]) -> str:
    mean, sd = entry["mean"], entry["sd"]
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.3f} ± {sd:.3f}" if sd is not None and math.isfinite(sd) else f"{mean:.3f}"


def _delta(interval: dict[str, Any] | None) -> str:
    """A paired difference as ``-0.020 ±0.015`` (half the 95 % interval), or ``-``."""
    if not interval or interval.get("difference") is None:
        return "-"
    diff, low, high = interval["difference"], interval.get("low"), interval.get("high")
    if low is None or high is None:
        return f"{diff:+.3f}"
    return f"{diff:+.3f} ±{(high - low) / 2:.3f}"


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the utility-versus-privacy table (site, figure, one column a level).

    Each level's column holds the mean ± sd over the splits of the held-out AUC, the paired
    difference from the run without DP (± half its 95 % corrected t interval), and the epsilon
    each site spent (mean; the largest in brackets when it differs).
    """
    labels = list(result["levels"])
    header = ["site", "figure", *[("no DP" if lb == "none" else
                                   f"eps {lb.replace('+stats', ' + noisy stats')}")
                                  for lb in labels]]
    rows = []
    sites = list(result["levels"][labels[0]]["sites"])
    for name in sites:
        for m in METHODS:
            rows.append([name, f"{m} AUC", *[_cell(result["levels"][lb]["sites"][name][m])
                                             for lb in labels]])
        for m in METHODS:
            rows.append([name, f"{m} - no DP", *[_delta(result["levels"][lb]["sites"][name]
                                                        .get("vs_no_dp", {}).get(m))
                                                 for lb in labels]])
        spent = []
        for lb in labels:
            e = result["levels"][lb]["sites"][name]
            if e["epsilon_mean"] is None:
                spent.append("-")
                continue
            text = f"{e['epsilon_mean']:.2f}"
            if e["epsilon_max"] - e["epsilon_mean"] > 0.005:
                text += f" (max {e['epsilon_max']:.2f})"
            if e["stopped_runs"]:
                text += f", stopped {e['stopped_runs']}x"
            spent.append(text)
        rows.append([name, "epsilon spent", *spent])
    return header, rows


def markdown(result: dict[str, Any]) -> str:
    """The table as Markdown, with what was run."""
    header, rows = table_rows(result)
    lines = [
        f"# Utility against privacy ({result['data']})", "",
        f"{result['splits']} seeded splits, each a whole run per level; strategy "
        f"{result['strategy']}, {result['rounds']} rounds, record-level DP at delta "
        f"{result['delta']:g}, clipping norm {result['clip']:g}. Held-out AUC: mean ± sd over "
        "the splits; '- no DP': the paired difference from the run without DP on the same split, "
        "mean ± half its 95 % interval (corrected resampled t: the splits share patients). "
        "'epsilon spent': what each site's accountant reported at the end of a run (mean over "
        "splits).", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows], "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    """AUC against epsilon per site (adapted and source), the run without DP at the right."""
    labels = list(result["levels"])
    sites = list(result["levels"][labels[0]]["sites"])
    fig = _new_figure(3.2 * len(sites), 3.4)
    axes = fig.subplots(1, len(sites), squeeze=False)[0]
    xs = np.arange(len(labels))
    for ax, name in zip(axes, sites, strict=True):
        for m, style in zip(METHODS, ("-o", "--s"), strict=True):
            ent = [result["levels"][lb]["sites"][name][m] for lb in labels]
            mean = np.array([e["mean"] if e["mean"] is not None else np.nan for e in ent])
            sd = np.array([e["sd"] if e["sd"] is not None else np.nan for e in ent])
            ax.errorbar(xs, mean, yerr=sd, fmt=style, capsize=3, label=m)
        ax.set_xticks(xs, ["no DP" if lb == "none" else f"ε={lb}".replace("+stats", "+s")
                           for lb in labels])
        ax.set_title(name)
        ax.set_ylabel("held-out AUC")
        ax.legend(fontsize=8)
    return _save_figure(fig, path)
