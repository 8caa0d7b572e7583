"""Render a run's report: ``report.json``, ``report.md``, two PNG plots and a terminal table."""

from server.report.common import METHODS, METRICS, Report, methods_in, to_jsonable
from server.report.files import mark_incomplete, remove_report, write_report
from server.report.markdown import MAX_MARKDOWN_SITES, render_markdown
from server.report.plots import MAX_BAR_SITES, plot_loss, plot_metrics
from server.report.table import site_table

__all__ = [
    "MAX_BAR_SITES",
    "MAX_MARKDOWN_SITES",
    "METHODS",
    "METRICS",
    "Report",
    "mark_incomplete",
    "methods_in",
    "plot_loss",
    "plot_metrics",
    "remove_report",
    "render_markdown",
    "site_table",
    "to_jsonable",
    "write_report",
]
