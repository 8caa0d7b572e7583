"""What a site's results mean: intervals on paired differences, the best model, plain words.

Everything here reads the aggregates the sites sent (per repeat) and turns them into what a
person needs to judge them: whether a lead is larger than its uncertainty, whether a held-out
set is large enough to judge at all, which model the site should use and why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from shared.protocol import METHODS, PAIRS

# A held-out set with fewer rows of either class cannot tell models apart: its AUC rests on a
# handful of patients (the same ten-events rule the sites apply before fitting on features).
MIN_CLASS_ROWS_TO_JUDGE = 10

def paired_interval(
    values: Sequence[dict[str, Any]], a: str, b: str, n_train: int, n_test: int,
) -> dict[str, Any]:
    """Mean AUC difference ``a - b`` on the same patients, with a 95 % interval.

    With one split, the site's paired bootstrap interval. With K >= 2 seeded splits, the
    corrected resampled t interval (Nadeau and Bengio, 2003): the K differences share training
    rows, so their variance is inflated by ``1/K + n_test/n_train`` instead of ``1/K``.

    Returns
    -------
    dict
        ``difference``, ``low``, ``high``, ``method`` (``bootstrap`` or ``corrected t``) and
        ``splits`` (how many splits had both classes).
    """
    key = f"diff.{a}-{b}"
    diffs = [float(v[f"{key}.auc"]) for v in values
             if isinstance(v.get(f"{key}.auc"), float) and math.isfinite(v[f"{key}.auc"])]
    out: dict[str, Any] = {"difference": None, "low": None, "high": None,
                           "method": None, "splits": len(diffs)}
    if not diffs:
        return out
    mean = float(np.mean(diffs))
    if len(diffs) == 1:
        first = next(v for v in values if math.isfinite(v.get(f"{key}.auc", math.nan)))
        low, high = first.get(f"{key}.auc_lo"), first.get(f"{key}.auc_hi")
        ok = all(isinstance(x, float) and math.isfinite(x) for x in (low, high))
        return {**out, "difference": mean, "low": low if ok else None,
                "high": high if ok else None, "method": "bootstrap"}
    k = len(diffs)
    var = float(np.var(diffs, ddof=1)) * (1.0 / k + n_test / max(n_train, 1))
    half = float(stats.t.ppf(0.975, k - 1)) * math.sqrt(var)
    return {**out, "difference": mean, "low": mean - half, "high": mean + half,
            "method": "corrected t"}


def judgeable(positives: int, n_test: int) -> bool:
    """Whether a held-out set has enough rows of each class to tell models apart."""
    return min(positives, n_test - positives) >= MIN_CLASS_ROWS_TO_JUDGE


def assess(entry: dict[str, Any], values: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The site's best method, how sure that is, and which model it should use, in words.

    Parameters
    ----------
    entry : dict
        The site's report entry (metrics per method, sizes, correction).
    values : sequence of dict
        The site's evaluate replies, one per repeat.

    Returns
    -------
    dict
        ``comparisons`` (per pair: difference and interval), ``best`` (method), ``lead``
        (``clear``, ``within uncertainty`` or ``not judged``), ``judgeable``, ``uses`` (the
        model the site uses against the better other one: ``versus``, ``difference``,
        ``low``, ``high``), ``verdict`` (one line) and ``use`` (the model the site should
        use, and why).
    """
    n_train, n_test = int(entry["n_train"]), int(entry["n_test"])
    comparisons = {f"{a}-{b}": paired_interval(values, a, b, n_train, n_test)
                   for a, b in PAIRS}
    aucs = {m: entry["metrics"].get(m, {}).get("auc") for m in METHODS}
    choice = entry.get("model", {}).get("choice") or "source"
    # A site that uses the source model has "adapted" = "source": one model, not two to rank.
    defined = {m: v for m, v in aucs.items()
               if v is not None and not (m == "adapted" and choice == "source")}
    ok = judgeable(int(entry["positives_test"]), n_test)
    out: dict[str, Any] = {"comparisons": comparisons, "judgeable": ok, "best": None,
                           "runner_up": None, "lead": "not judged"}
    if len(defined) >= 2:
        ranked = sorted(defined, key=lambda m: -float(defined[m]))
        best, second = ranked[0], ranked[1]
        interval = _interval(comparisons, best, second)
        clear = (interval is not None and interval["low"] is not None
                 and interval["low"] > 0)
        out.update(best=best, runner_up=second,
                   lead=("clear" if clear else "within uncertainty") if ok else "not judged")
    out["uses"] = _uses(aucs, comparisons, choice)
    out["verdict"] = _verdict(out, aucs, comparisons, n_test, int(entry["positives_test"]))
    reason = entry.get("model", {}).get("reason") or "chosen by cross-validation"
    out["use"] = f"use {choice}: {reason.removeprefix(f'{choice}: ')}"
    return out


def _uses(aucs: dict[str, Any], comparisons: dict[str, dict[str, Any]], choice: str
          ) -> dict[str, Any] | None:
    """The model the site uses against the better other model: which, and the difference.

    The model the site uses is ``adapted`` (its choice: a correction, a blend, the local
    model, or the source model itself, which is then not its own rival).
    """
    rivals = [m for m in ("local", "source") if aucs.get(m) is not None
              and not (m == "source" and choice == "source")]
    if aucs.get("adapted") is None or not rivals:
        return None
    rival = max(rivals, key=lambda m: float(aucs[m]))
    return {"versus": rival, **(_interval(comparisons, "adapted", rival) or {})}


def _interval(comparisons: dict[str, dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """The interval of ``a - b`` (from either direction of the stored pair)."""
    if f"{a}-{b}" in comparisons:
        return comparisons[f"{a}-{b}"]
    c = comparisons.get(f"{b}-{a}")
    if c is None or c["difference"] is None:
        return c
    flip = {"low": -c["high"] if c["high"] is not None else None,
            "high": -c["low"] if c["low"] is not None else None}
    return {**c, "difference": -c["difference"], **flip}


def _verdict(out: dict[str, Any], aucs: dict[str, Any], comparisons: dict[str, Any],
             n_test: int, positives: int) -> str:
    if out["best"] is None:
        return (f"AUC undefined: the held-out set ({n_test} rows, {positives} positive) has one "
                "class")
    best, second = out["best"], out["runner_up"]
    interval = _interval(comparisons, best, second) or {}
    span = ("" if interval.get("low") is None else
            f" (difference {interval['difference']:+.3f}, 95 % interval "
            f"{interval['low']:+.3f} to {interval['high']:+.3f})")
    if not out["judgeable"]:
        return (f"too few patients to judge: {positives} positive / {n_test - positives} "
                f"negative held-out rows (fewer than {MIN_CLASS_ROWS_TO_JUDGE} of a class), so "
                "no model can be judged on them and the choice rests on cross-validation "
                f"alone; {best} has the highest AUC here{span}")
    if out["lead"] == "clear":
        return f"{best} is best, clearly ahead of {second}{span}"
    return f"{best} has the highest AUC, but not clearly ahead of {second}{span}"
