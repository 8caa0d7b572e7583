"""Render a run's report as a Markdown document."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from server.report.common import (
    _DASH,
    _METRIC_TITLES,
    METRICS,
    _best_method,
    _fmt,
    _fmt_int,
    _fmt_pct,
    _is_failed,
    _mean_metric,
    _num,
    _plural,
    _positives,
    _repeats,
    _site_metrics,
    _sites,
    _value_sd,
    methods_in,
    to_jsonable,
)

MAX_MARKDOWN_SITES = 50
"""Sites listed in the Markdown tables; the rest are counted in a note (all are in the JSON)."""

_TIMING_ORDER = ("total", "stats", "train", "adapt", "evaluate")


# ---------------------------------------------------------------- Markdown cells


def _md(text: Any) -> str:
    """Make text safe for a Markdown table cell (no pipes, no line breaks)."""
    return " ".join(str(text).split()).replace("|", r"\|")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> list[str]:
    """Return the lines of a Markdown table; ``align`` holds ``l``/``r`` per column."""
    aligns = align.ljust(len(header), "l")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else ":---" for a in aligns) + "|",
    ]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return lines


# ---------------------------------------------------------------- sections


def _metric_section(
    report: Mapping[str, Any],
    metric: str,
    methods: Sequence[str],
    shown: Sequence[tuple[str, dict[str, Any]]],
) -> list[str]:
    """Return a per-metric Markdown table: sites as rows, methods as columns, a mean row."""
    repeats = _repeats(report)
    header = ["site", "n test", "positives (prevalence)", *methods]
    rows: list[list[str]] = []
    partial_auc = False
    for name, site in shown:
        row = [_md(name), _fmt_int(site.get("n_test")), _positives(site)]
        if _is_failed(site):
            rows.append(row + [_md(site.get("status", "failed"))] * len(methods))
            continue
        best = _best_method(site, methods, metric) if metric == "auc" else None
        for method in methods:
            value, sd = _value_sd(site, method, metric)
            cell = _fmt(value, sd)
            if metric == "auc" and value is not None and repeats:
                auc_n = _num(_site_metrics(site, method).get("auc_n"))
                if auc_n is not None and int(auc_n) < repeats:
                    cell += f" (n={int(auc_n)})"
                    partial_auc = True
            if method == best:
                cell = f"**{cell}**"
            row.append(cell)
        rows.append(row)
    n_ok = sum(not _is_failed(site) for _, site in _sites(report))
    rows.append(
        [f"**mean ({_plural(n_ok, 'site')} with results)**", "", ""]
        + [_fmt(_mean_metric(report, m, metric)) for m in methods]
    )
    lines = [f"### {_METRIC_TITLES[metric]}", ""]
    lines += _md_table(header, rows, "lrr" + "r" * len(methods))
    notes = []
    if metric == "auc":
        notes.append("Bold: the best AUC at the site. A dash: AUC undefined (one class in test).")
        if partial_auc:
            notes.append(
                f"(n=k): AUC was defined in only k of the {repeats} repeats; "
                "the mean is over those."
            )
    if notes:
        lines += ["", " ".join(notes)]
    return [*lines, ""]


def _correction_section(shown: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Return the table of each site's private correction."""
    rows = []
    for name, site in shown:
        corr = site.get("correction") or {}
        applied = corr.get("applied")
        features = site.get("site_features") or []
        rows.append(
            [
                _md(name),
                f"site {_md(site.get('status', 'failed'))}"
                if _is_failed(site)
                else (_DASH if applied is None else ("yes" if applied else "no")),
                _fmt(_num(corr.get("strength"))),
                _fmt_pct(_num(corr.get("applied_fraction")), 0),
                _md(", ".join(str(f) for f in features)) if features else _DASH,
            ]
        )
    header = ["site", "applied", "strength", "applied fraction", "site features"]
    return [
        "## Private corrections",
        "",
        "Applied fraction: the share of repeats in which the site's correction was used.",
        "",
        *_md_table(header, rows, "llrrl"),
        "",
    ]


def _summary_section(report: Mapping[str, Any], methods: Sequence[str]) -> list[str]:
    """Return the summary: mean metrics per method next to the majority-label baseline."""
    summary = report.get("summary") or {}
    majority = _num(summary.get("majority_accuracy"))
    rows = []
    for method in methods:
        accuracy = _mean_metric(report, method, "accuracy")
        gain = _DASH
        if accuracy is not None and majority is not None:
            gain = f"{accuracy - majority:+.3f}"
        rows.append(
            [
                method,
                _fmt(_mean_metric(report, method, "auc")),
                _fmt(accuracy),
                gain,
                _fmt(_mean_metric(report, method, "brier")),
                _fmt(_mean_metric(report, method, "log_loss")),
            ]
        )
    rows.append(["majority label (baseline)", _DASH, _fmt(majority), _DASH, _DASH, _DASH])
    header = ["method", "mean AUC", "mean accuracy", "vs majority", "mean Brier", "log loss"]
    sites = _sites(report)
    failed = sum(_is_failed(site) for _, site in sites)
    lines = [
        "## Summary",
        "",
        f"Means over the sites with results ({len(sites) - failed} of "
        f"{_plural(len(sites), 'site')}). "
        "The majority-label baseline predicts each site's most frequent label; "
        "an accuracy at or below it means the model adds little.",
        "",
        *_md_table(header, rows, "lrrrrr"),
        "",
    ]
    compared = [
        (a, s)
        for _, site in sites
        if not _is_failed(site)
        for a, s in [(_value_sd(site, "adapted", "auc")[0], _value_sd(site, "source", "auc")[0])]
        if a is not None and s is not None
    ]
    if compared:
        better = sum(a > s for a, s in compared)
        lines += [
            f"Adapted beats source on AUC at {better} of {_plural(len(compared), 'site')}.",
            "",
        ]
    return lines


def _failed_section(sites: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    """Return the list of failed sites with their error."""
    failed = [(name, site) for name, site in sites if _is_failed(site)]
    if not failed:
        return []
    lines = ["## Failed sites", ""]
    for name, site in failed[:MAX_MARKDOWN_SITES]:
        status = _md(site.get("status", "failed"))
        lines.append(f"- **{_md(name)}** ({status}): {_md(site.get('error') or 'no error given')}")
    if len(failed) > MAX_MARKDOWN_SITES:
        lines.append(f"- … and {len(failed) - MAX_MARKDOWN_SITES} more (see report.json).")
    return [*lines, ""]


def _timing_section(report: Mapping[str, Any]) -> list[str]:
    """Return the time spent per stage."""
    timing = report.get("timing_s") or {}
    if not timing:
        return []
    total = _num(timing.get("total"))
    keys = [k for k in _TIMING_ORDER if k in timing] + [k for k in timing if k not in _TIMING_ORDER]
    rows = []
    for key in keys:
        seconds = _num(timing[key])
        share = _DASH
        if key != "total" and seconds is not None and total:
            share = _fmt_pct(seconds / total, 0)
        rows.append([_md(key), _fmt(seconds, digits=1), share])
    return ["## Timing", "", *_md_table(["stage", "seconds", "share"], rows, "lrr"), ""]


def _config_value(value: Any) -> str:
    """Format one config value compactly for a table cell."""
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(to_jsonable(value), ensure_ascii=False, separators=(", ", ": "))
    if len(text) > 120:
        text = text[:119] + "…"
    safe = _md(text).replace("`", "'")
    return f"`{safe}`"


def _config_section(report: Mapping[str, Any]) -> list[str]:
    """Return the run's settings as a two-column table."""
    config = report.get("config") or {}
    if not config:
        return []
    rows = [[_md(key), _config_value(value)] for key, value in config.items()]
    return ["## Configuration", "", *_md_table(["setting", "value"], rows), ""]


def render_markdown(report: dict[str, Any], plots: dict[str, Path] | None = None) -> str:
    """Render a report as a Markdown document.

    Parameters
    ----------
    report : dict
        A run's report (see the module's contract). NaN values are shown as null.
    plots : dict of str to Path, optional
        Images to link, by name (``"metrics"``, ``"loss"``, or others), as paths relative to the
        folder the Markdown is written to. Without it, no images are linked.

    Returns
    -------
    str
        The document: an explanation, one table per metric (sites as rows, methods as columns,
        a mean row), the figures, the corrections, the summary against the majority-label
        baseline, failed sites, timing and configuration.
    """
    config = report.get("config") or {}
    methods = methods_in(report)
    sites = _sites(report)
    shown = sites[:MAX_MARKDOWN_SITES]
    repeats = _repeats(report)
    version = config.get("fedadapt_version")

    lines = ["# fedadapt run report", ""]
    about = (
        "This report compares, for every participating site, models evaluated on the site's "
        "own held-out test split. **source** is the shared model trained by federated learning "
        "across all sites; **adapted** is the source model plus the site's private correction, "
        "which never leaves the site; **local** is a model trained by the site alone on its own "
        "data."
    )
    if "pooled" in methods:
        about += (
            " **pooled** is a central model trained on all sites' data put together: a "
            "non-federated reference, available only in simulation."
        )
    if repeats and repeats > 1:
        about += (
            f" Values are means over {repeats} repeats with a different split, "
            "shown as mean ± standard deviation."
        )
    about += " Only aggregate results appear here, never patient data."
    lines += [about, ""]
    facts = [
        f"{key}: `{_md(config[key])}`"
        for key in ("data", "schema", "protocol", "strategy", "model", "num-server-rounds", "seed")
        if key in config
    ]
    if version is not None:
        facts.insert(0, f"fedadapt `{_md(version)}`")
    if facts:
        lines += ["Run: " + "; ".join(facts) + ".", ""]

    lines += ["## Results per site", ""]
    if len(sites) > len(shown):
        lines += [
            f"Showing the first {len(shown)} of {len(sites)} sites; "
            "the mean rows cover all of them, and report.json lists every site.",
            "",
        ]
    if not sites:
        lines += ["No sites in this report.", ""]
    else:
        for metric in METRICS:
            lines += _metric_section(report, metric, methods, shown)

    if plots:
        captions = {"metrics": "Per-site metrics by method", "loss": "Training loss by round"}
        lines += ["## Figures", ""]
        for name, path in plots.items():
            lines += [f"![{captions.get(name, name)}]({Path(path).as_posix()})", ""]

    if sites:
        lines += _correction_section(shown)
    lines += _summary_section(report, methods)
    lines += _failed_section(sites)
    lines += _timing_section(report)
    lines += _config_section(report)
    return "\n".join(lines).rstrip() + "\n"
