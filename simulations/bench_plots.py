"""Plots and the terminal table of ``fedadapt bench`` (from ``bench.json``'s content)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.report.plots import _new_figure, _save_figure


def plot_bench(bench: dict[str, Any], folder: Path) -> list[str]:
    """Write ``rounds.png`` (log-loss per round beside pooled) and ``scale.png``; their paths."""
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
    return paths


def _f(value: Any, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


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
    for rows_n, m in (bench.get("correction_fit") or {}).items():
        rows.append((f"correction fit, {int(rows_n):,} rows",
                     f"{_f(m.get('seconds'), '.1f', ' s')}, {_f(m.get('peak_gib'), '.2f', ' GiB')}",
                     f"{t['fit_s']:.0f} s, {t['fit_gib']:g} GiB at 1M"))
    if bench.get("predict_rows_per_s") is not None:
        rows.append(("predict", f"{bench['predict_rows_per_s']:,.0f} rows/s", "-"))
    b = bench.get("bytes_per_round")
    if b and b.get("site_bytes") is not None:
        rows.append(("bytes per site per round", f"{b['site_bytes']} B (model {b['model_bytes']}"
                     f" B, ratio {b['ratio']:.1f})", f"<= {b['limit_bytes']:.0f} B"))
    return rows
