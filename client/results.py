"""A site's own held-out results, kept in its folder by every evaluate phase."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FOLDER = "evaluations"


@dataclass(frozen=True)
class Result:
    """One run's (and repeat's) held-out figures at the site."""

    run: int
    repeat: int
    metrics: dict[str, Any]
    choice: str

    def row(self) -> tuple[str, ...]:
        """Table cells: run, repeat, sizes, AUCs, the paired difference with its interval."""
        m = self.metrics

        def num(key: str) -> str:
            v = m.get(key)
            return "-" if v is None or not math.isfinite(float(v)) else f"{float(v):.3f}"

        diff = num("diff.adapted-local.auc")
        interval = (f" [{num('diff.adapted-local.auc_lo')}, {num('diff.adapted-local.auc_hi')}]"
                    if diff != "-" else "")
        model = self.choice.replace("correction", "corr.")
        return (str(self.run), str(self.repeat + 1), f"{int(m.get('n-test') or 0)}",
                f"{int(m.get('positives-test') or 0)}", num("local.auc"), num("source.auc"),
                num("adapted.auc"), diff + interval, model)


def read_results(site_dir: str | Path) -> list[Result]:
    """Every kept result of a site, oldest first (unreadable files are skipped)."""
    out = []
    folder = Path(site_dir) / FOLDER
    paths = sorted(folder.glob("run-*.json"), key=lambda p: p.stat().st_mtime) if \
        folder.is_dir() else []
    for path in paths:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            out.append(Result(int(doc["run"]), int(doc["repeat"]), dict(doc["metrics"]),
                              str(doc.get("model-choice", ""))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out
