"""Write every file of a run's report atomically (JSON, Markdown, plots); retire stale ones."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from server.report.common import _json_text, to_jsonable
from server.report.markdown import render_markdown
from server.report.plots import plot_calibration, plot_loss, plot_metrics
from shared.files import write_atomically

PRIVATE = 0o600  # the federation's results, as private as the rest of the run's folder

log = logging.getLogger(__name__)

# The files of a complete report, relative to the output folder.
REPORT_FILES = ("report.json", "report.md")
PLOTS = "plots"
INCOMPLETE = ".incomplete"


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
    write_atomically(paths["json"], _json_text(clean).encode("utf-8"), mode=PRIVATE)
    paths["metrics"] = plot_metrics(clean, out / "plots" / "metrics.png")
    paths["loss"] = plot_loss(clean, out / "plots" / "loss.png")
    paths["calibration"] = plot_calibration(clean, out / "plots" / "calibration.png")
    relative = {name: paths[name].relative_to(out) for name in ("metrics", "calibration", "loss")}
    paths["markdown"] = out / "report.md"
    write_atomically(paths["markdown"], render_markdown(clean, relative).encode("utf-8"),
                     mode=PRIVATE)
    return paths


def remove_report(out_dir: str | Path) -> None:
    """Remove an earlier run's report from ``out_dir`` (before a new run writes there)."""
    out = Path(out_dir)
    for name in REPORT_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / PLOTS, ignore_errors=True)


def mark_incomplete(out_dir: str | Path) -> list[Path]:
    """Rename a report of an interrupted or failed run so that it cannot pass for complete.

    ``report.json`` becomes ``report.incomplete.json`` (and so on): what was written is kept
    for inspection, under a name that says what it is. Returns the renamed files.
    """
    out = Path(out_dir)
    renamed = []
    for name in REPORT_FILES:
        path = out / name
        if path.exists():
            target = path.with_name(path.stem + INCOMPLETE + path.suffix)
            path.replace(target)
            renamed.append(target)
    if (out / PLOTS).exists():
        shutil.rmtree(out / (PLOTS + INCOMPLETE), ignore_errors=True)
        (out / PLOTS).replace(out / (PLOTS + INCOMPLETE))
        renamed.append(out / (PLOTS + INCOMPLETE))
    if renamed:
        log.warning("the run did not complete: its partial report is in %s",
                    ", ".join(str(p) for p in renamed))
    return renamed
