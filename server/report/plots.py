"""Draw a run's report figures: per-site metrics and training loss, as PNG files."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.report.common import (
    _METRIC_SHORT,
    _METRIC_TITLES,
    METRICS,
    _fmt_int,
    _fmt_pct,
    _is_failed,
    _num,
    _plural,
    _repeats,
    _sites,
    _value_sd,
    methods_in,
    short_choice,
)
from shared.files import write_atomically

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MAX_BAR_SITES = 30
"""Above this many sites, ``plot_metrics`` draws sorted per-site differences instead of bars."""

_METHOD_LABELS = {
    "local": "local (site alone)",
    "source": "source (federated)",
    "adapted": "adapted (the site's chosen model)",
    "pooled": "pooled (central reference)",
    "oracle": "true model (not a ceiling)",
}
_METHOD_COLORS = {
    "local": "#8c8c8c",
    "source": "#1f77b4",
    "adapted": "#ff7f0e",
    "pooled": "#2ca02c",
    "oracle": "#d0d0d0",
}
_PLOT_DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    """Return a matplotlib figure attached to an Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_figure(figure: Figure, path: Path) -> Path:
    """Render a figure to PNG and write it atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_PLOT_DPI)
    write_atomically(path, buffer.getvalue(), mode=0o600)
    return path


def _site_label(name: str, site: Mapping[str, Any], limit: int = 18) -> str:
    """Return a tick label: the site name over its test size and prevalence."""
    short = name if len(name) <= limit else name[: limit - 1] + "…"
    if _is_failed(site):
        return f"{short}\nfailed"
    prevalence = _fmt_pct(_num(site.get("prevalence_test")), 0)
    judged = (site.get("assessment") or {}).get("judgeable", True)
    uses = f"\nuses {short_choice(site)}" if (site.get("model") or {}).get("choice") else ""
    return (f"{short}\nn={_fmt_int(site.get('n_test'))}, {prevalence}"
            + ("" if judged else " (too few)") + uses)


def _value_spread(site: Mapping[str, Any], method: str, metric: str
                  ) -> tuple[float | None, float | None]:
    """A bar's value and error bar: the sd over splits, or with one split about 1.96 SE.

    With one split there is no sd; AUC then gets Hanley and McNeil's standard error (from the
    held-out positives and negatives), accuracy the binomial one; Brier none.
    """
    value, sd = _value_sd(site, method, metric)
    if value is None or sd is not None:
        return value, sd
    n, pos = _num(site.get("n_test")), _num(site.get("positives_test"))
    if n is None or pos is None or not 0 < pos < n:
        return value, None
    if metric == "auc":
        a, n1, n2 = value, pos, n - pos
        q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
        var = (a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n2 - 1) * (q2 - a * a)) / (n1 * n2)
        return value, 1.96 * math.sqrt(max(var, 0.0))
    if metric == "accuracy":
        return value, 1.96 * math.sqrt(max(value * (1 - value), 0.0) / n)
    return value, None


def _bar_panels(
    figure: Figure, report: Mapping[str, Any], methods: Sequence[str], title: str
) -> None:
    """Draw one panel per metric with grouped bars (methods) per site and their error bars.

    The legend, titled ``title``, sits above the panels (a suptitle would collide with it).
    """
    sites = _sites(report)
    axes = figure.subplots(len(METRICS), 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(len(sites), dtype=float)
    width = 0.8 / len(methods)
    brier_top = max(
        [
            (v or 0.0) + (sd or 0.0)
            for _, site in sites
            for m in methods
            for v, sd in [_value_sd(site, m, "brier")]
        ]
        + [0.05]
    )
    for ax, metric in zip(axes, METRICS, strict=True):
        top = 1.08 if metric != "brier" else brier_top * 1.2
        for j, method in enumerate(methods):
            offset = x + (j - (len(methods) - 1) / 2) * width
            pairs = [_value_spread(site, method, metric) for _, site in sites]
            heights = np.array([np.nan if v is None else v for v, _ in pairs])
            ax.bar(
                offset,
                np.nan_to_num(heights),
                width * 0.95,
                color=_METHOD_COLORS[method],
                hatch="//" if method == "pooled" else None,
                edgecolor="white" if method != "pooled" else "#1a6e1a",
                linewidth=0.5,
                label=_METHOD_LABELS[method],
            )
            with_sd = [i for i, (v, sd) in enumerate(pairs) if v is not None and sd is not None]
            if with_sd:
                ax.errorbar(
                    offset[with_sd],
                    heights[with_sd],
                    yerr=[pairs[i][1] for i in with_sd],
                    fmt="none",
                    ecolor="#222222",
                    elinewidth=0.9,
                    capsize=2.5,
                )
            for i, ((value, _), (_, site)) in enumerate(zip(pairs, sites, strict=True)):
                if value is None and not _is_failed(site):
                    ax.text(
                        offset[i],
                        top * 0.02,
                        "n/a",
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="#555555",
                    )
        for i, (_, site) in enumerate(sites):
            if _is_failed(site):
                ax.text(
                    x[i],
                    top / 2,
                    str(site.get("status", "failed")),
                    ha="center",
                    va="center",
                    fontsize=9,
                    color="#b22222",
                    rotation=90 if len(sites) > 8 else 0,
                )
        if metric == "auc":
            ax.axhline(0.5, color="#555555", linestyle=":", linewidth=1, label="chance (AUC 0.5)")
        if metric == "accuracy":
            label = "majority-label baseline (per site)"
            for i, (_, site) in enumerate(sites):
                p = _num(site.get("prevalence_test"))
                if p is None or _is_failed(site):
                    continue
                ax.hlines(
                    max(p, 1 - p),
                    x[i] - 0.45,
                    x[i] + 0.45,
                    colors="#222222",
                    linestyles="--",
                    linewidth=1.2,
                    label=label,
                )
                label = "_nolegend_"
        ax.set_ylim(0, top)
        ax.set_title(_METRIC_TITLES[metric], loc="left", fontsize=11)
        ax.set_ylabel(_METRIC_SHORT[metric])
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles, labels = [], []
    for ax in axes[:2]:  # methods and chance line (AUC panel), majority baseline (accuracy)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    order = sorted(
        range(len(labels)), key=lambda i: ("chance" in labels[i], "majority" in labels[i])
    )
    # Two rows always: one row of seven long entries overflowed even the widest figure.
    figure.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside upper center",
        ncols=math.ceil(len(labels) / 2),
        fontsize=9,
        frameon=False,
        title=title,
        title_fontsize=13,
    )
    axes[-1].set_xticks(
        x,
        [_site_label(name, site) for name, site in sites],
        rotation=45 if len(sites) > 8 else 0,
        ha="right" if len(sites) > 8 else "center",
        fontsize=8,
    )
    axes[-1].set_xlabel("site (held-out rows n, prevalence; too few: under 10 of a class, not "
                        "judged; the model it uses)")
    pad = max(0.0, (3 - len(sites)) / 2)  # keep bars narrow with one or two sites
    axes[-1].set_xlim(-0.6 - pad, len(sites) - 0.4 + pad)


def _difference_panels(figure: Figure, report: Mapping[str, Any]) -> None:
    """Draw, per metric, the sorted per-site differences adapted − source (for many sites)."""
    sites = [site for _, site in _sites(report) if not _is_failed(site)]
    axes = figure.subplots(1, len(METRICS), squeeze=False)[0, :]
    for ax, metric in zip(axes, METRICS, strict=True):
        diffs = np.array(
            sorted(
                a - s
                for site in sites
                for a, s in [
                    (_value_sd(site, "adapted", metric)[0], _value_sd(site, "source", metric)[0])
                ]
                if a is not None and s is not None
            )
        )
        _difference_axis(ax, metric, diffs, len(sites))


def _difference_axis(ax: Axes, metric: str, diffs: np.ndarray, n_sites: int) -> None:
    """Draw one metric's sorted adapted − source differences with a count of improvements."""
    lower_better = metric == "brier"
    ax.axhline(0, color="#222222", linewidth=1)
    title = f"{_METRIC_TITLES[metric]}\nadapted − source per site"
    ax.set_title(title, loc="left", fontsize=11)
    ax.set_xlabel("sites, sorted by difference")
    ax.set_ylabel(f"Δ {_METRIC_SHORT[metric]} (adapted − source)")
    ax.grid(alpha=0.3)
    if diffs.size == 0:
        ax.text(
            0.5,
            0.5,
            "no site with both values",
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="#555555",
        )
        return
    improved = diffs < 0 if lower_better else diffs > 0
    ranks = np.arange(1, diffs.size + 1)
    size = float(np.clip(400 / diffs.size, 2, 25))
    ax.scatter(
        ranks[improved],
        diffs[improved],
        s=size,
        color=_METHOD_COLORS["adapted"],
        label="adapted better",
        linewidths=0,
    )
    ax.scatter(
        ranks[~improved],
        diffs[~improved],
        s=size,
        color=_METHOD_COLORS["source"],
        label="source better or equal",
        linewidths=0,
    )
    ax.axhline(
        float(np.median(diffs)),
        color="#555555",
        linestyle="--",
        linewidth=1,
        label=f"median {np.median(diffs):+.3f}",
    )
    note = f"adapted better at {int(improved.sum())} of {diffs.size} sites"
    if diffs.size < n_sites:
        note += f"\n({n_sites - diffs.size} without both values)"
    ax.text(
        0.02,
        0.98,
        note,
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=9,
        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "#cccccc"},
    )
    ax.legend(fontsize=8, loc="lower right")


def plot_metrics(report: dict[str, Any], path: Path) -> Path:
    """Plot the per-site metrics of every method and write the PNG.

    Parameters
    ----------
    report : dict
        A run's report.
    path : Path
        Where to write the PNG (its folder is created).

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    Up to ``MAX_BAR_SITES`` sites: three stacked panels (AUC, accuracy, Brier, the last one
    lower-is-better) with grouped bars per site, one per method, error bars of one sd when
    there were repeats (else about 95 % intervals of AUC and accuracy), a chance line at AUC
    0.5, each site's majority-label accuracy, and the test size and prevalence under each
    site name. Above that: three panels of the sorted
    per-site differences adapted − source, with how many sites improved.
    """
    sites = _sites(report)
    methods = methods_in(report)
    failed = sum(_is_failed(site) for _, site in sites)
    bars = len(sites) <= MAX_BAR_SITES
    title = f"Test metrics per site ({_plural(len(sites), 'site')}"
    title += f", {failed} failed)" if failed else ")"
    repeats = _repeats(report)
    if repeats and repeats > 1:
        title += f"; mean over {repeats} repeats" + (", error bars ±1 sd" if bars else "")
    elif bars:
        title += "; error bars ±1.96 SE (AUC: Hanley-McNeil; accuracy: binomial)"
    if bars and sites:
        width = float(np.clip(2.5 + 0.3 * len(sites) * len(methods), 11, 22))
        figure = _new_figure(width, 10.5)
        _bar_panels(figure, report, methods, title)
    elif bars:
        figure = _new_figure(8, 4)
        figure.suptitle(title, fontsize=13)
        figure.text(0.5, 0.5, "no sites in this report", ha="center", va="center", fontsize=14)
    else:
        figure = _new_figure(16, 5.5)
        figure.suptitle(title, fontsize=13)
        _difference_panels(figure, report)
    return _save_figure(figure, path)


def plot_loss(report: dict[str, Any], path: Path) -> Path:
    """Plot the federated training loss by round and write the PNG.

    Parameters
    ----------
    report : dict
        A run's report; its ``rounds`` list may be empty.
    path : Path
        Where to write the PNG (its folder is created).

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    A line of the loss per round with a band of ±1 sd across repeats where known. Without any
    recorded round, the figure says so.
    """
    points = [
        (int(r["round"]), loss, _num(r.get("loss_sd")))
        for r in report.get("rounds") or []
        if isinstance(r, Mapping) and _num(r.get("round")) is not None
        for loss in [_num(r.get("loss"))]
        if loss is not None
    ]
    points.sort()
    figure = _new_figure(8, 4.5)
    ax = figure.subplots()
    ax.set_title("Federated training loss by round (source model)", loc="left")
    ax.set_xlabel("server round")
    ax.set_ylabel("training loss (aggregated over sites)")
    ax.grid(alpha=0.3)
    if not points:
        ax.text(
            0.5,
            0.5,
            "no rounds recorded",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=14,
            color="#555555",
        )
        ax.set_xticks([])
        ax.set_yticks([])
        return _save_figure(figure, path)

    from matplotlib.ticker import MaxNLocator

    rounds = np.array([p[0] for p in points], dtype=float)
    loss = np.array([p[1] for p in points])
    sd = np.array([np.nan if p[2] is None else p[2] for p in points])
    ax.plot(
        rounds,
        loss,
        marker="o" if len(points) <= 40 else None,
        markersize=4,
        color=_METHOD_COLORS["source"],
        label="loss",
    )
    if np.isfinite(sd).any():
        ax.fill_between(
            rounds,
            loss - sd,
            loss + sd,
            where=np.isfinite(sd),
            alpha=0.25,
            color=_METHOD_COLORS["source"],
            linewidth=0,
            label="±1 sd across repeats",
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper right")
    return _save_figure(figure, path)


CALIBRATION_METHODS = ("local", "source", "adapted")
MAX_CALIBRATION_SITES = 16


def calibration_sites(report: Mapping[str, Any]
                      ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """The sites with a reliability curve to draw, and the names of the others.

    At most ``MAX_CALIBRATION_SITES`` are drawn; the others failed, withheld their results,
    had too few held-out rows for a bin, or are beyond the limit.
    """
    every = _sites(report)
    sites = [(n, s) for n, s in every
             if not _is_failed(s) and any((s.get("reliability") or {}).get(m, {}).get(
                 "predicted") for m in CALIBRATION_METHODS)][:MAX_CALIBRATION_SITES]
    shown = {n for n, _ in sites}
    return sites, [n for n, _ in every if n not in shown]


def plot_calibration(report: dict[str, Any], path: Path) -> Path:
    """Plot each site's reliability curves (predicted risk against observed rate); write PNG.

    Parameters
    ----------
    report : dict
        A run's report (``sites.<name>.reliability``).
    path : Path
        Where to write the PNG.

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    One small panel per site (up to ``MAX_CALIBRATION_SITES``), one curve per site method,
    each point a bin of at least ten held-out patients (quantiles of the predicted risk); the
    diagonal is perfect calibration, and the legend gives each method's calibration slope.
    """
    every = _sites(report)
    sites, left_out = calibration_sites(report)
    cols = max(1, min(4, len(sites)))
    rows = max(1, -(-len(sites) // cols))
    figure = _new_figure(3.4 * cols, 3.2 * rows + 0.6)
    figure.suptitle("Calibration per site: mean predicted risk vs observed rate "
                    "(bins of >= 10 held-out patients)", fontsize=12)
    if not sites:
        figure.text(0.5, 0.5, "no site has enough held-out rows for a reliability curve",
                    ha="center", va="center", fontsize=11)
        return _save_figure(figure, path)
    axes = figure.subplots(rows, cols, squeeze=False)
    for ax, (name, site) in zip(axes.ravel(), sites, strict=False):
        ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle=":")
        for method in CALIBRATION_METHODS:
            curve = (site.get("reliability") or {}).get(method) or {}
            if not curve.get("predicted"):
                continue
            slope = _num(((site.get("metrics") or {}).get(method) or {}).get("cal_slope"))
            label = f"{method}" + (f" (slope {slope:.2f})" if slope is not None else "")
            ax.plot(curve["predicted"], curve["observed"], marker="o", markersize=3,
                    linewidth=1.2, color=_METHOD_COLORS[method], label=label)
        ax.set_title(_site_label(name, site).replace("\n", " · ", 1), fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted risk", fontsize=8)
        ax.set_ylabel("observed rate", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left")
    spare = list(axes.ravel()[len(sites):])
    for ax in spare:
        ax.set_visible(False)
    if left_out:  # said where it is seen: in a spare panel, else under the panels
        note = ("not shown: " + ", ".join(left_out[:12]) + (" …" if len(left_out) > 12 else "")
                + "\n(failed, withheld, or fewer held-out patients than one bin of 10"
                + (", or beyond the first " + str(MAX_CALIBRATION_SITES) + " sites"
                   if len(every) > MAX_CALIBRATION_SITES else "") + ")")
        if spare:
            spare[0].set_visible(True)
            spare[0].axis("off")
            wrapped = "\n".join(textwrap.fill(part, 44) for part in note.split("\n"))
            spare[0].text(0.0, 0.5, wrapped, ha="left", va="center", fontsize=8,
                          transform=spare[0].transAxes)
        else:
            figure.text(0.5, 0.005, note.replace("\n", " "), ha="center", va="bottom",
                        fontsize=8)
    return _save_figure(figure, path)
