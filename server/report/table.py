"""Build the terminal table of a run's per-site results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from server.report.common import (
    _DASH,
    _METRIC_SHORT,
    METRICS,
    _best_method,
    _fmt,
    _fmt_int,
    _fmt_pct,
    _is_failed,
    _mean_metric,
    _num,
    _sites,
    _value_sd,
    methods_in,
)

if TYPE_CHECKING:
    from rich.table import Table


def site_table(report: dict[str, Any], max_rows: int | None = None) -> Table:
    """Build a compact terminal table of the per-site results.

    Parameters
    ----------
    report : dict
        A run's report.
    max_rows : int, optional
        Show at most this many sites (a last row counts the rest); all by default.

    Returns
    -------
    rich.table.Table
        One row per site (then a mean row): status, n test, prevalence, and one column per
        metric holding every method's value as ``local / source / adapted / pooled``. The best
        AUC of each site is bold. About 130 characters wide with four methods.
    """
    from rich.table import Table
    from rich.text import Text

    methods = methods_in(report)
    sites = _sites(report)
    shown = sites if max_rows is None else sites[:max_rows]
    short = {"local": "local", "source": "src", "adapted": "adapt", "pooled": "pool"}
    order = "/".join(short[m] for m in methods)
    table = Table(
        title="fedadapt: test metrics per site",
        caption=f"cells: {' / '.join(methods)}; bold = best AUC at the site; — = undefined",
        show_edge=False,
        pad_edge=False,
        header_style="bold",
    )
    table.add_column("site", overflow="ellipsis", max_width=24, no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("n test", justify="right", no_wrap=True)
    table.add_column("prev.", justify="right", no_wrap=True)
    for metric in METRICS:
        table.add_column(f"{_METRIC_SHORT[metric]}\n{order}", justify="center", no_wrap=True)

    def cells(values: Sequence[float | None], bold_index: int | None) -> Text:
        text = Text()
        for i, value in enumerate(values):
            if i:
                text.append(" / ", style="dim")
            text.append(_fmt(value), style="bold" if i == bold_index else "")
        return text

    for name, site in shown:
        prevalence = _fmt_pct(_num(site.get("prevalence_test")))
        status = str(site.get("status", "ok"))
        if _is_failed(site):
            blank = Text(_DASH, style="dim")
            table.add_row(
                Text(name),
                Text(status, style="bold red"),
                _fmt_int(site.get("n_test")),
                prevalence,
                *[blank] * len(METRICS),
            )
            continue
        metric_cells = []
        for metric in METRICS:
            values = [_value_sd(site, method, metric)[0] for method in methods]
            best = None
            if metric == "auc":
                best_method = _best_method(site, methods, "auc")
                best = methods.index(best_method) if best_method else None
            metric_cells.append(cells(values, best))
        table.add_row(
            Text(name),
            Text(status, style="green"),
            _fmt_int(site.get("n_test")),
            prevalence,
            *metric_cells,
        )
    if len(shown) < len(sites):
        table.add_row(Text(f"… {len(sites) - len(shown)} more", style="dim"), "", "", "")
    if sites:
        table.add_section()
        table.add_row(
            Text("mean", style="bold"),
            "",
            "",
            "",
            *[
                cells([_mean_metric(report, m, metric) for m in methods], None)
                for metric in METRICS
            ],
        )
    return table
