"""Write every file of a run's report atomically: JSON, Markdown and the two plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from server.report.common import _json_text, to_jsonable
from server.report.markdown import render_markdown
from server.report.plots import plot_loss, plot_metrics
from shared.files import write_atomically


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
    write_atomically(paths["json"], _json_text(clean).encode("utf-8"))
    paths["metrics"] = plot_metrics(clean, out / "plots" / "metrics.png")
    paths["loss"] = plot_loss(clean, out / "plots" / "loss.png")
    relative = {name: paths[name].relative_to(out) for name in ("metrics", "loss")}
    paths["markdown"] = out / "report.md"
    write_atomically(paths["markdown"], render_markdown(clean, relative).encode("utf-8"))
    return paths
