"""Build the terminal table of a run's per-site results (at most 100 columns)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.report.common import _DASH, _fmt, _is_failed, _num, _sites, _value_sd

if TYPE_CHECKING:
    from rich.table import Table

SITE_METHODS = ("local", "source", "adapted")
REFERENCES = ("pooled", "oracle")  # not a site's own choice: shown when present
SHORT = {"local": "local", "source": "source", "adapted": "adapted", "pooled": "pooled",
         "oracle": "best"}


def _model(site: dict[str, Any]) -> str:
    """The model the site uses, short: ``local C=0.3``, ``blend 3/4``, ``recalibration``."""
    choice = str((site.get("model") or {}).get("choice") or "source")
    return (choice.replace(" source + local", "").replace("recalibration", "recalibrated")
            .replace("correction", "corr."))


def _lead(site: dict[str, Any]) -> str:
    """The best site method's lead over the runner-up: ``+0.021±0.030``, or why there is none.

    ``!`` marks a lead larger than its uncertainty (the 95 % interval excludes 0).
    """
    a = site.get("assessment") or {}
    best, second = a.get("best"), a.get("runner_up")
    if best is None:
        return "AUC undef."
    comparisons = a.get("comparisons") or {}
    c = comparisons.get(f"{best}-{second}") or comparisons.get(f"{second}-{best}") or {}
    if c.get("difference") is None:
        return _DASH
    sign = 1 if f"{best}-{second}" in comparisons else -1
    diff = sign * c["difference"]
    if c.get("low") is None:
        return f"{diff:+.3f}"
    half = (c["high"] - c["low"]) / 2
    return f"{diff:+.3f}±{half:.3f}" + ("!" if a.get("lead") == "clear" else "")


def site_table(report: dict[str, Any], max_rows: int | None = None) -> Table:
    """Build the terminal table of per-site AUCs (100 columns at most).

    Parameters
    ----------
    report : dict
        A run's report.
    max_rows : int, optional
        Show at most this many sites (a last row counts the rest); all by default.

    Returns
    -------
    rich.table.Table
        One row per site: held-out rows and positives (``*``: too few to judge), the AUC of
        the site's local-only model, the shared source model and the model the site uses
        (``adapted``), the references when present (pooled central model, best achievable),
        the best of the three site methods with its lead over the runner-up and that lead's
        95 % half-width, and the model the site uses. Then the means: over the sites that can
        judge, and weighted by held-out rows.
    """
    from rich.box import SIMPLE_HEAD
    from rich.table import Table
    from rich.text import Text

    sites = _sites(report)
    shown = sites if max_rows is None else sites[:max_rows]
    refs = [m for m in REFERENCES if any(m in (s.get("metrics") or {}) for _, s in sites)]
    table = Table(
        title="fedadapt: held-out AUC per site",
        caption=("bold: the site's best model; lead: its AUC minus the runner-up's ± half "
                 "the 95 % interval (! clear lead); * too few held-out rows of a class to judge; "
                 "best: the best achievable"),
        box=SIMPLE_HEAD, pad_edge=False, padding=(0, 1), header_style="bold",
    )
    table.add_column("site", overflow="ellipsis", max_width=12, no_wrap=True, min_width=6)
    table.add_column("held-out", justify="right", no_wrap=True, min_width=7)
    for method in (*SITE_METHODS, *refs):
        table.add_column(SHORT[method], justify="right", no_wrap=True,
                         min_width=len(SHORT[method]))
    table.add_column("lead", no_wrap=True, min_width=12)
    table.add_column("site uses", overflow="ellipsis", max_width=16, no_wrap=True)

    for name, site in shown:
        n, pos = _num(site.get("n_test")), _num(site.get("positives_test"))
        judged = (site.get("assessment") or {}).get("judgeable", True)
        held = _DASH if n is None or site.get("status") == "withheld" else \
            f"{int(n)}/{int(pos or 0)}" + ("" if judged else "*")
        if _is_failed(site):
            blanks = [Text(_DASH, style="dim")] * (len(SITE_METHODS) + len(refs))
            table.add_row(Text(name), held, *blanks,
                          Text(str(site.get("status", "failed")), style="bold red"), "")
            continue
        best = (site.get("assessment") or {}).get("best")
        cells = []
        for method in (*SITE_METHODS, *refs):
            value = _value_sd(site, method, "auc")[0]
            style = "bold" if method == best else ("dim" if method in refs else "")
            cells.append(Text(_fmt(value), style=style))
        table.add_row(Text(name), held, *cells, Text(_lead(site)), Text(_model(site)))
    if len(shown) < len(sites):
        table.add_row(Text(f"… {len(sites) - len(shown)} more", style="dim"))
    methods = (report.get("summary") or {}).get("methods") or {}
    if methods:
        table.add_section()
        for label, key in (("mean", "mean_auc"), ("weighted", "weighted_auc")):
            table.add_row(Text(label, style="bold"), "", *[
                Text(_fmt(_num((methods.get(m) or {}).get(key)))) for m in (*SITE_METHODS, *refs)
            ], "", "")
    return table
