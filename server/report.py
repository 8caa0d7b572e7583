"""Render a run's report: ``report.json``, ``report.md``, two PNG plots and a terminal table."""

from __future__ import annotations

import io
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from rich.table import Table

METHODS = ("local", "source", "adapted", "pooled")
"""Every method a report may hold, in display order; ``pooled`` only exists in simulation."""

METRICS = ("auc", "accuracy", "brier")
"""The per-site metrics shown in tables and plots (log loss is in the summary only)."""

MAX_MARKDOWN_SITES = 50
"""Sites listed in the Markdown tables; the rest are counted in a note (all are in the JSON)."""

MAX_BAR_SITES = 30
"""Above this many sites, ``plot_metrics`` draws sorted per-site differences instead of bars."""

_METRIC_TITLES = {
    "auc": "AUC (higher is better)",
    "accuracy": "Accuracy (higher is better)",
    "brier": "Brier score (lower is better)",
    "log_loss": "Log loss (lower is better)",
}
_METRIC_SHORT = {"auc": "AUC", "accuracy": "accuracy", "brier": "Brier", "log_loss": "log loss"}
_SUMMARY_KEYS = {
    "auc": "mean_auc",
    "accuracy": "mean_accuracy",
    "brier": "mean_brier",
    "log_loss": "log_loss",
}
_METHOD_LABELS = {
    "local": "local (site alone)",
    "source": "source (federated)",
    "adapted": "adapted (source + correction)",
    "pooled": "pooled (central reference)",
}
_METHOD_COLORS = {
    "local": "#8c8c8c",
    "source": "#1f77b4",
    "adapted": "#ff7f0e",
    "pooled": "#2ca02c",
}
_TIMING_ORDER = ("total", "stats", "train", "adapt", "evaluate")
_DASH = "—"
_PLOT_DPI = 120

Report = dict[str, Any]


# ---------------------------------------------------------------- JSON


def to_jsonable(obj: Any) -> Any:
    """Convert a value to plain JSON types, turning every non-finite float into ``None``.

    Parameters
    ----------
    obj : Any
        A report or any part of it: mappings, sequences, numpy scalars and arrays, paths,
        floats (NaN and infinities included), and plain JSON values.

    Returns
    -------
    Any
        The same structure made of ``dict`` (with ``str`` keys), ``list``, ``str``, ``int``,
        finite ``float``, ``bool`` and ``None`` only. Paths become strings, sets become sorted
        lists, and anything else unknown becomes its ``str``.
    """
    if obj is None or isinstance(obj, bool | str):
        return obj
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(key): to_jsonable(value) for key, value in obj.items()}
    if isinstance(obj, set | frozenset):
        return [to_jsonable(value) for value in sorted(obj, key=str)]
    if isinstance(obj, list | tuple):
        return [to_jsonable(value) for value in obj]
    if isinstance(obj, Path):
        return obj.as_posix()
    return str(obj)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Parameters
    ----------
    path : Path
        Destination; readers see either the old file or the complete new one.
    data : bytes
        File contents.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        # "x" creates the file with the usual permissions (0o666 minus the umask).
        with tmp.open("xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # noqa: PTH105  (atomic rename on the same filesystem)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_text(report: Report) -> str:
    """Serialise an already JSON-able report strictly (no NaN, no infinity)."""
    return json.dumps(report, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- reading the report


def _num(value: Any) -> float | None:
    """Return ``value`` as a finite float, or ``None`` for null, NaN, infinity and non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _sites(report: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Return the report's sites as ``(name, entry)`` pairs in report order."""
    sites = report.get("sites") or {}
    return [(str(name), entry if isinstance(entry, dict) else {}) for name, entry in sites.items()]


def _is_failed(site: Mapping[str, Any]) -> bool:
    """Whether a site entry is marked failed."""
    return str(site.get("status", "ok")) != "ok"


def _site_metrics(site: Mapping[str, Any], method: str) -> dict[str, Any]:
    """Return one method's metrics of a site, or an empty dict."""
    metrics = site.get("metrics") or {}
    entry = metrics.get(method) if isinstance(metrics, Mapping) else None
    return dict(entry) if isinstance(entry, Mapping) else {}


def _value_sd(
    site: Mapping[str, Any], method: str, metric: str
) -> tuple[float | None, float | None]:
    """Return ``(mean, sd)`` of one metric of one method at one site, ``None`` when absent."""
    entry = _site_metrics(site, method)
    return _num(entry.get(metric)), _num(entry.get(f"{metric}_sd"))


def methods_in(report: Mapping[str, Any]) -> list[str]:
    """Return the methods to display, in ``METHODS`` order.

    Parameters
    ----------
    report : dict
        A run's report.

    Returns
    -------
    list of str
        ``local``, ``source`` and ``adapted``, plus ``pooled`` when at least one site (or the
        summary) has it.
    """
    present = {"local", "source", "adapted"}
    for _, site in _sites(report):
        metrics = site.get("metrics") or {}
        if isinstance(metrics, Mapping):
            present.update(str(key) for key in metrics)
    summary_methods = (report.get("summary") or {}).get("methods") or {}
    present.update(str(key) for key in summary_methods)
    return [method for method in METHODS if method in present]


def _mean_metric(report: Mapping[str, Any], method: str, metric: str) -> float | None:
    """Return the across-site mean of a metric: the summary's value, else computed from sites."""
    summary = ((report.get("summary") or {}).get("methods") or {}).get(method)
    if isinstance(summary, Mapping) and _SUMMARY_KEYS[metric] in summary:
        return _num(summary[_SUMMARY_KEYS[metric]])
    values = [
        v
        for _, site in _sites(report)
        if not _is_failed(site)
        for v in [_value_sd(site, method, metric)[0]]
        if v is not None
    ]
    return float(np.mean(values)) if values else None


def _repeats(report: Mapping[str, Any]) -> int | None:
    """Return the configured number of repeats, if known."""
    value = _num((report.get("config") or {}).get("repeats"))
    return int(value) if value is not None else None


def _best_method(site: Mapping[str, Any], methods: Sequence[str], metric: str) -> str | None:
    """Return the method with the highest value of ``metric`` at a site (first one on ties)."""
    best: tuple[float, str] | None = None
    for method in methods:
        value = _value_sd(site, method, metric)[0]
        if value is not None and (best is None or value > best[0]):
            best = (value, method)
    return best[1] if best else None


# ---------------------------------------------------------------- formatting


def _fmt(value: float | None, sd: float | None = None, digits: int = 3) -> str:
    """Format ``0.812 ± 0.031``, ``0.812`` without sd, or an em dash for null."""
    if value is None:
        return _DASH
    text = f"{value:.{digits}f}"
    return f"{text} ± {sd:.{digits}f}" if sd is not None else text


def _fmt_pct(value: float | None, digits: int = 1) -> str:
    """Format a fraction as a percentage, or an em dash for null."""
    return _DASH if value is None else f"{100 * value:.{digits}f}%"


def _fmt_int(value: Any) -> str:
    """Format a count, or an em dash for null."""
    number = _num(value)
    return _DASH if number is None else f"{int(number)}"


def _positives(site: Mapping[str, Any]) -> str:
    """Format ``23 (19.2%)`` from a site's positives and prevalence on its test split."""
    return f"{_fmt_int(site.get('positives_test'))} ({_fmt_pct(_num(site.get('prevalence_test')))})"


def _plural(count: int, noun: str) -> str:
    """Return ``"1 site"`` or ``"3 sites"``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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


# ---------------------------------------------------------------- Markdown


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
            rows.append(row + ["failed"] * len(methods))
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
                "site failed"
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


# ---------------------------------------------------------------- terminal


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


# ---------------------------------------------------------------- plots


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
    _atomic_write_bytes(path, buffer.getvalue())
    return path


def _site_label(name: str, site: Mapping[str, Any], limit: int = 18) -> str:
    """Return a tick label: the site name over its test size and prevalence."""
    short = name if len(name) <= limit else name[: limit - 1] + "…"
    if _is_failed(site):
        return f"{short}\nfailed"
    prevalence = _fmt_pct(_num(site.get("prevalence_test")), 0)
    return f"{short}\nn={_fmt_int(site.get('n_test'))}, {prevalence}"


def _bar_panels(
    figure: Figure, report: Mapping[str, Any], methods: Sequence[str], title: str
) -> None:
    """Draw one panel per metric with grouped bars (methods) per site and sd error bars.

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
            pairs = [_value_sd(site, method, metric) for _, site in sites]
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
                    "failed",
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
    wide = figure.get_figwidth() >= 14
    figure.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        loc="outside upper center",
        ncols=len(labels) if wide else math.ceil(len(labels) / 2),
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
    axes[-1].set_xlabel("site (test size n, prevalence)")
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
    there were repeats, a chance line at AUC 0.5, each site's majority-label accuracy, and the
    test size and prevalence under each site name. Above that: three panels of the sorted
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


# ---------------------------------------------------------------- all files


def write_report(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md, plots/metrics.png and plots/loss.png; return paths by name.

    Parameters
    ----------
    report : dict
        A run's report. Non-finite floats become null and numpy values plain numbers; the
        caller's dict is not modified.
    out_dir : str or Path
        Output folder, created if needed. Every file is written atomically (a temporary file
        in the same folder, then a rename).

    Returns
    -------
    dict of str to Path
        ``{"json": ..., "markdown": ..., "metrics": ..., "loss": ...}``.
    """
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(report)
    paths = {"json": out / "report.json"}
    _atomic_write_bytes(paths["json"], _json_text(clean).encode("utf-8"))
    paths["metrics"] = plot_metrics(clean, out / "plots" / "metrics.png")
    paths["loss"] = plot_loss(clean, out / "plots" / "loss.png")
    relative = {name: paths[name].relative_to(out) for name in ("metrics", "loss")}
    paths["markdown"] = out / "report.md"
    _atomic_write_bytes(paths["markdown"], render_markdown(clean, relative).encode("utf-8"))
    return paths
