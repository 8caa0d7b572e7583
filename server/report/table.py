"""Build the terminal table of a run's per-site results (at most 100 columns)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from server.report.common import (
    _DASH,
    _fmt,
    _is_failed,
    _num,
    _sites,
    _value_sd,
    short_choice,
)

if TYPE_CHECKING:
    from rich.table import Table

SITE_METHODS = ("local", "source", "adapted")
REFERENCES = ("pooled", "oracle")  # not a site's own choice: shown when present
SHORT = {"local": "local", "source": "source", "adapted": "adapted", "pooled": "pooled",
         "oracle": "true"}
RIVAL = {"local": "loc", "source": "src"}  # the other model in the "vs other" column


def _model(site: dict[str, Any]) -> str:
    """The model the site uses, short (:func:`server.report.common.short_choice`)."""
    return short_choice(site)


def _lead(site: dict[str, Any]) -> str:
    """The model the site uses against the better other one: ``-0.036±0.060 local``.

    Its AUC minus the other's, ± half the 95 % interval; ``!`` marks a difference larger than
    its uncertainty (the interval excludes 0); then the other model's name.
    """
    a = site.get("assessment") or {}
    if a.get("best") is None:
        return "AUC undef."
    u = a.get("uses") or {}
    if u.get("difference") is None:
        return _DASH
    text = f"{u['difference']:+.3f}"
    if u.get("low") is not None:
        clear = u["low"] > 0 or u["high"] < 0
        text += f"±{(u['high'] - u['low']) / 2:.3f}" + ("!" if clear else "")
    return f"{text} {RIVAL[u['versus']]}"


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
        (``adapted``), the references when present (pooled central model, the true model),
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
    # Newton reaches the pooled fit: a pooled column equal to the source one says nothing.
    same = "pooled" in refs and all(
        _value_sd(s, "pooled", "auc")[0] == _value_sd(s, "source", "auc")[0] for _, s in sites)
    if same:
        refs.remove("pooled")
    table = Table(
        title="fedadapt: held-out AUC per site",
        caption=("n/pos.: held-out rows/positives (* too few of a class to judge); "
                 "vs other: the AUC of the model the site uses minus the better other model's "
                 "± half the 95 % interval (! beyond it; loc, src: local, source); bold (in "
                 "a terminal): the highest AUC"
                 + ("; true: the AUC of the model that generated the data (not a ceiling)"
                    if "oracle" in refs
                    else "")
                 + ("; the pooled central model's AUC equals the source model's at every "
                    "site (the federated fit is the pooled fit)" if same else "")),
        box=SIMPLE_HEAD, pad_edge=False, padding=(0, 1), header_style="bold",
    )
    table.add_column("site", overflow="ellipsis", max_width=12, no_wrap=True, min_width=6)
    table.add_column("n/pos.", justify="right", no_wrap=True, min_width=7)
    for method in (*SITE_METHODS, *refs):
        table.add_column(SHORT[method], justify="right", no_wrap=True,
                         min_width=len(SHORT[method]))
    table.add_column("vs other", no_wrap=True, min_width=12)
    # Within 100 columns: each reference column not shown leaves room for a longer choice.
    table.add_column("site uses", overflow="ellipsis", max_width=14 + 9 * (2 - len(refs)),
                     no_wrap=True)

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
