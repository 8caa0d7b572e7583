"""Plots and the terminal table of ``fedadapt bench`` (from ``bench.json``'s content)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.report.plots import _new_figure, _save_figure


def plot_bench(bench: dict[str, Any], folder: Path) -> list[str]:
    """Write the plots of the parts that ran; return their paths.

    ``rounds.png`` (log-loss per round beside pooled), ``scale.png`` (wall time beside the
    bare app), ``privacy.png`` (AUC against epsilon per site).
    """
    paths = []
    detail = bench.get("rounds_detail") or {}
    if detail:
        fig = _new_figure(5.0 * len(detail), 3.6)
        axes = fig.subplots(1, len(detail), squeeze=False)[0]
        for ax, (data, res) in zip(axes, detail.items(), strict=True):
            for name, r in res["strategies"].items():
                ax.plot(range(1, len(r["log_loss"]) + 1), r["log_loss"], marker=".",
                        label=f"{name} ({r['rounds'] or 'never'} rounds)")
            pooled = res["pooled_log_loss"]
            ax.axhline(pooled, color="black", lw=1, label="pooled")
            ax.axhspan(pooled, pooled + res["within"], color="grey", alpha=0.2,
                       label=f"within {res['within']}")
            ax.set_title(f"{data}: held-out log-loss of the source model")
            ax.set_xlabel("round")
            ax.set_ylim(pooled - 0.02, pooled + 0.12)
            ax.legend(fontsize=8)
        paths.append(str(_save_figure(fig, folder / "rounds.png")))
    scale = bench.get("scale") or {}
    if scale:
        fig = _new_figure(6.0, 3.6)
        ax = fig.subplots()
        sites = sorted(int(k) for k in scale)
        for key, label in (("wall_s", "fedadapt simulate"), ("bare_wall_s", "bare Flower app")):
            ax.plot(sites, [scale[str(n)].get(key) or float("nan") for n in sites],
                    marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("virtual sites")
        ax.set_ylabel("wall seconds")
        ax.set_title("wall time at scale (same nodes and rounds)")
        ax.legend(fontsize=8)
        paths.append(str(_save_figure(fig, folder / "scale.png")))
    if bench.get("privacy"):
        from bench.privacy import plot

        paths.append(str(plot(bench["privacy"], folder / "privacy.png")))
    return paths


def _f(value: Any, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _measured(m: dict[str, Any], text: str) -> str:
    """A site measurement's figures, or why there are none (stopped, failed)."""
    return text if m.get("status", "ok") == "ok" else str(m["status"])[:60]


def bench_rows(bench: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(figure, measured, target) rows for the terminal table (fits 100 columns)."""
    t = bench["targets"]
    rows: list[tuple[str, str, str]] = []
    for data, by in (bench.get("rounds_to_pooled") or {}).items():
        rows.append((f"rounds to pooled, {data}",
                     ", ".join(f"{s} {v if v is not None else 'never'}" for s, v in by.items()),
                     f"newton <= {t['newton_rounds']}"))
    over = bench.get("overhead") or {}
    for key, label in (("simulate", "simulate vs bare"), ("deploy", "deploy-local vs bare")):
        if key in over:
            m = over[key]
            rows.append((label, f"{_f(m['vs_bare'], '.2f', 'x')} ({_f(m['wall_s'], '.0f')} s vs "
                         f"{_f(m['bare_wall_s'], '.0f')} s, {m['rounds']} rounds)",
                         f"<= {t['simulate_vs_bare']}x" if key == "simulate" else "-"))
    for n, m in (bench.get("scale") or {}).items():
        rows.append((f"{n} sites x {m['rounds']} rounds",
                     f"{_f(m['wall_s'], '.0f', ' s')}, round {_f(m['round_s'], '.1f', ' s')}, "
                     f"{_f(m['peak_rss_gib'], '.2f', ' GiB')}, lost {m['lost_sites']}; bare "
                     f"{_f(m['bare_wall_s'], '.0f', ' s')} ({_f(m['vs_bare'], '.2f', 'x')})",
                     f"{t['scale_wall_s']:.0f} s, {t['scale_gib']:g} GiB"))
    rows += _site_rows(bench)
    b = bench.get("bytes_per_round")
    if b and b.get("site_bytes") is not None:
        rows.append(("bytes per site per round", f"{b['site_bytes']} B (model {b['model_bytes']}"
                     f" B, ratio {b['ratio']:.1f})", f"<= {b['limit_bytes']:.0f} B"))
    rows += _choice_rows(bench.get("choice") or {})
    rows += _secagg_rows(bench.get("secagg") or {})
    d = bench.get("deploy")
    if d:
        median = (d["deploy_round_latency_s"] or {}).get("median")
        diff = d.get("max_metric_difference")
        rows.append((f"deploy-local vs simulate, {d['sites']} sites",
                     f"{d['deploy_wall_s']:.0f} s vs {d['simulation_wall_s']:.0f} s; round "
                     f"{_f(median)} s vs {_f(d['simulation_round_latency_s'])} s",
                     f"same metrics ({_f(diff, '.0e')})"))
    p = bench.get("privacy")
    if p:
        rows.append((f"utility against privacy, {p['splits']} splits",
                     f"{len(p['levels'])} levels: privacy.md and the table below", "-"))
    for data, res in (bench.get("nonlinear") or {}).items():
        sites = res["sites"].values()
        rows.append((f"boosted trees chosen, {data}",
                     f"{sum(s['boosting_chosen'] for s in sites)} of "
                     f"{sum(s['splits'] for s in sites)} site-splits", "-"))
    bare = bench.get("bare")
    if bare:
        rows.append((f"bare app, {bare['mode']}, {bare['nodes']} nodes",
                     f"{bare['wall_s']:.0f} s, {bare['rounds']} rounds, round "
                     f"{_f(bare.get('later_round_median_s') or bare['round_median_s'])} s, "
                     f"{_f(bare.get('peak_rss_gib'), '.2f', ' GiB')}", "-"))
    return rows


def _site_rows(bench: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows of the site part: the model choice, the local-only model, predict."""
    t = bench["targets"]
    rows = []
    for rows_n, m in (bench.get("correction_fit") or {}).items():
        rows.append((f"correction fit, {int(rows_n):,} rows",
                     _measured(m, f"{_f(m.get('seconds'), '.1f', ' s')}, "
                                  f"{_f(m.get('peak_gib'), '.2f', ' GiB')}"),
                     f"{t['fit_s']:.0f} s, {t['fit_gib']:g} GiB at 1M"))
    for rows_n, m in (bench.get("local_fit") or {}).items():
        rows.append((f"local-only model, {int(rows_n):,} rows",
                     _measured(m, f"{_f(m.get('seconds'), '.1f', ' s')}, "
                                  f"{_f(m.get('peak_gib'), '.2f', ' GiB')}"), "-"))
    for rows_n, m in (bench.get("predict") or {}).items():
        rows.append((f"predict, {int(rows_n):,} rows",
                     _measured(m, f"{_f(m.get('rows_per_s'), ',.0f')} rows/s, "
                                  f"{_f(m.get('peak_gib'), '.2f', ' GiB')}"), "-"))
    if not bench.get("predict") and bench.get("predict_rows_per_s") is not None:
        rows.append(("predict", f"{bench['predict_rows_per_s']:,.0f} rows/s", "-"))
    return rows


def _choice_rows(choice: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows of the choice part: the default run's time, the rule, FLamby's accuracy."""
    rows = []
    if "default" in choice:
        d = choice["default"]
        rows.append(("default simulate", f"{d['wall_s']:.1f} s", f"< {d['target_s']:g} s"))
    for data in ("generated", "heart"):
        if data in choice:
            r = choice[data]
            rows.append((f"rule, {data}, {r['repeats']} splits",
                         f"every site within 0.01: {_yes(r['every_site_within_0.01'])}; above "
                         f"both at {r['sites_above_both']}", "every site; >= 2"))
    if "generated" in choice:
        rows.append(("large generated sites vs best", "within 0.02: "
                     + _yes(choice["generated"]["large_sites_within_0.02"]), "every site"))
    if "flamby" in choice:
        f = choice["flamby"]
        rows.append(("FLamby mean accuracy", f"adapted {f['mean_accuracy']['adapted']:.3f}",
                     f">= {f['target']:g}"))
    return rows


def _yes(value: Any) -> str:
    return "yes" if value else "no"


def _secagg_rows(sa: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The secagg part: one secure sum per size; a deployed round with and without."""
    rows = []
    for n, m in (sa.get("sums") or {}).items():
        rows.append((f"secure sum, {n} sites ({m['neighbours']} neighbours), {m['values']} "
                     "values", f"CPU {_f(m.get('site_cpu_s'), '.3f', ' s')} a site, "
                     f"{_f(m.get('coordinator_cpu_s'), '.2f', ' s')} the coordinator; wall "
                     f"{_f(m['wall_s'], '.2f', ' s')}, {m['bytes_per_site'] / 1024:.0f} KiB per "
                     f"site, error {m['max_error']:.1e} (bound {m['error_bound']:.1e})", "-"))
    dep = sa.get("deployed")
    if dep:
        rows.append((f"deployed round, {dep['sites']} sites (TLS), plain vs secagg",
                     f"{_f(dep['plain']['median_round_s'], '.1f', ' s')} vs "
                     f"{_f(dep['secagg']['median_round_s'], '.1f', ' s')} (median of "
                     f"{dep['rounds'] - 1} round gaps); stats phase "
                     f"{_f(dep['plain']['stats_s'], '.1f', ' s')} vs "
                     f"{_f(dep['secagg']['stats_s'], '.1f', ' s')}", "-"))
    return rows
