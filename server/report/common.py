"""Shared report helpers: constants, JSON conversion, atomic writes, accessors and formatters."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("local", "source", "adapted", "pooled", "oracle")
"""Every method a report may hold, in display order; ``pooled`` only exists in simulation."""

METRICS = ("auc", "accuracy", "brier")
"""The per-site metrics shown in tables and plots (log loss is in the summary only)."""

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
_DASH = "—"

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


def short_choice(site: Mapping[str, Any]) -> str:
    """The model a site uses, short: ``corr. C=0.3``, ``blend 1/4 C=0.1``, ``recalibrated``."""
    choice = str((site.get("model") or {}).get("choice") or "source")
    return (choice.replace(" source + local", "").replace("recalibration", "recalibrated")
            .replace("correction", "corr."))
