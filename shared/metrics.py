"""Held-out metrics of a risk model, with AUC null (not a crash) where only one class is present."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score

METRIC_NAMES = ("auc", "accuracy", "brier", "log_loss")
EPS = 1e-7


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
        ``brier``, ``log_loss``, ``n`` and ``positives``. Empty input gives NaN metrics.
    """
    y = np.asarray(y, dtype=int)
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    n = len(y)
    if n == 0:
        return {"auc": math.nan, "accuracy": math.nan, "brier": math.nan,
                "log_loss": math.nan, "n": 0.0, "positives": 0.0}
    both = 0 < y.sum() < n
    return {
        "auc": float(roc_auc_score(y, p)) if both else math.nan,
        "accuracy": float(accuracy_score(y, p >= threshold)),
        "brier": float(brier_score_loss(y, p, labels=[0, 1])),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "n": float(n),
        "positives": float(y.sum()),
    }


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
