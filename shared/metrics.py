"""Held-out metrics of a risk model, with AUC null (not a crash) where only one class is present."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from shared.protocol import METRIC_NAMES

EPS = 1e-7
# A reliability bin holds at least this many held-out rows (a smaller one would say too much
# about too few patients, and too little about calibration).
MIN_BIN_ROWS = 10
MAX_BINS = 10
BOOTSTRAP_RESAMPLES = 500


def rank_auc(y: np.ndarray, score: np.ndarray) -> float:
    """AUC as the Mann-Whitney statistic (ties count one half); NaN with a single class.

    The same value as scikit-learn's ``roc_auc_score`` for binary labels, without its input
    validation, whose cost is paid on every call: a site's model choice computes hundreds of
    AUCs.
    """
    y = np.asarray(y, dtype=int)
    pos = int(y.sum())
    n = len(y)
    if pos == 0 or pos == n:
        return math.nan
    from scipy.stats import rankdata

    ranks = rankdata(np.asarray(score, dtype=float))
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2) / (pos * (n - pos)))


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, accuracy at ``threshold``, Brier score and log-loss of predicted risks.

    Parameters
    ----------
    y : numpy.ndarray
        True labels (0/1).
    p : numpy.ndarray
        Predicted probabilities of the positive class.
    threshold : float
        Risk above which a patient is predicted positive (accuracy).

    Returns
    -------
    dict
        ``auc`` (NaN when ``y`` has a single class: undefined, not 0.5), ``accuracy``,
        ``brier``, ``log_loss``, the calibration slope and intercept (``cal_slope``,
        ``cal_intercept``: NaN with one class), ``n`` and ``positives``. Empty input gives NaN
        metrics.
    """
    y = np.asarray(y, dtype=int)
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    n = len(y)
    if n == 0:
        return {**dict.fromkeys(METRIC_NAMES, math.nan), "n": 0.0, "positives": 0.0}
    both = 0 < y.sum() < n
    slope, intercept = calibration(y, p) if both else (math.nan, math.nan)
    return {
        "auc": rank_auc(y, p) if both else math.nan,
        # By hand, as scikit-learn defines them (its input checks cost milliseconds a call).
        "accuracy": float(np.mean((p >= threshold) == y)),
        "brier": float(np.mean((p - y) ** 2)),
        "log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))),
        "cal_slope": slope,
        "cal_intercept": intercept,
        "n": float(n),
        "positives": float(y.sum()),
    }


def calibration(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Calibration slope and intercept of predicted risks (logistic recalibration).

    The slope ``b`` of ``logit P(y) = a + b * logit(p)`` (1: ideal; below 1: risks too
    extreme, as from an overfitted model) and the calibration intercept ``a`` of
    ``logit P(y) = a + logit(p)`` (0: ideal; "calibration in the large": below 0, risks too
    high on average). Both are maximum-likelihood fits, by Newton's method (two parameters:
    written here rather than imported).

    Returns
    -------
    tuple of float
        ``(slope, intercept)``; NaN where the fit does not converge (a class almost absent).
    """
    y = np.asarray(y, dtype=float)
    lp = np.log(p) - np.log1p(-p)
    slope = _newton(np.column_stack([np.ones_like(lp), lp]), y, np.zeros_like(lp))
    intercept = _newton(np.ones((len(lp), 1)), y, lp)
    return (float(slope[1]) if slope is not None else math.nan,
            float(intercept[0]) if intercept is not None else math.nan)


def _newton(x: np.ndarray, y: np.ndarray, offset: np.ndarray) -> np.ndarray | None:
    beta = np.zeros(x.shape[1])
    for _ in range(50):
        eta = offset + x @ beta
        mu = sigmoid(eta)
        w = mu * (1 - mu)
        grad = x.T @ (y - mu)
        hess = (x * w[:, None]).T @ x + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        beta = beta + step
        if not np.all(np.isfinite(beta)) or np.max(np.abs(beta)) > 1e3:
            return None
        if np.max(np.abs(step)) < 1e-10:
            return beta
    return beta


def reliability(y: np.ndarray, p: np.ndarray) -> dict[str, list[float]]:
    """A reliability curve: mean predicted risk and observed rate in quantile bins.

    Bins hold at least ``MIN_BIN_ROWS`` rows each (at most ``MAX_BINS`` bins); fewer than 20
    rows give no curve. Only bin means and counts are returned, never a row.

    Returns
    -------
    dict
        ``predicted``, ``observed`` and ``rows`` per bin, ordered by predicted risk.
    """
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    bins = min(MAX_BINS, len(y) // MIN_BIN_ROWS)
    if bins < 2:
        return {"predicted": [], "observed": [], "rows": []}
    order = np.argsort(p, kind="stable")
    parts = np.array_split(order, bins)
    return {"predicted": [float(p[i].mean()) for i in parts],
            "observed": [float(y[i].mean()) for i in parts],
            "rows": [float(len(i)) for i in parts]}


def paired_auc_difference(
    y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> tuple[float, float, float]:
    """AUC of ``p_a`` minus AUC of ``p_b`` on the same patients, with a 95 % interval.

    The interval is the percentile interval of the paired bootstrap (the same resampled
    patients for both models), so it reflects how much the lead could change with other
    patients of the same site; resamples with a single class are skipped.

    Returns
    -------
    tuple of float
        ``(difference, low, high)``; NaN when AUC is undefined.
    """
    from scipy.stats import rankdata

    y = np.asarray(y, dtype=int)
    n = len(y)
    if not 0 < y.sum() < n:
        return math.nan, math.nan, math.nan
    diff = float(rank_auc(y, p_a) - rank_auc(y, p_b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    yb = y[idx]
    pos = yb.sum(axis=1)
    keep = (pos > 0) & (pos < n)
    if keep.sum() < 20:
        return diff, math.nan, math.nan
    idx, yb, pos = idx[keep], yb[keep], pos[keep]

    def auc(score: np.ndarray) -> np.ndarray:
        ranks = rankdata(np.asarray(score, dtype=float)[idx], axis=1)
        return ((ranks * yb).sum(axis=1) - pos * (pos + 1) / 2) / (pos * (n - pos))

    d = auc(p_a) - auc(p_b)
    return diff, float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation over repeats, ignoring undefined (NaN) values.

    Returns
    -------
    tuple
        ``(mean, sd, n_defined)``; mean is None when no value is defined, sd is None when
        fewer than two are.
    """
    defined = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not defined:
        return None, None, 0
    mean = float(np.mean(defined))
    sd = float(np.std(defined, ddof=1)) if len(defined) > 1 else None
    return mean, sd, len(defined)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function."""
    z = np.asarray(z, dtype=float)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out
