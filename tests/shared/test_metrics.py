"""Tests of the held-out metrics, their summaries over repeats and the logistic function."""

import math
import warnings

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import accuracy_score, brier_score_loss, log_loss, roc_auc_score

from shared.metrics import binary_metrics, mean_sd, sigmoid


def test_binary_metrics_match_sklearn() -> None:
    """AUC, accuracy at 0.5, Brier and log-loss equal scikit-learn's, with n and positives."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 * y + rng.uniform(0.0, 0.7, 200), 0.01, 0.99)
    m = binary_metrics(y, p)
    assert m["auc"] == pytest.approx(roc_auc_score(y, p), rel=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5), rel=1e-12)
    assert m["brier"] == pytest.approx(brier_score_loss(y, p), rel=1e-12)
    assert m["log_loss"] == pytest.approx(log_loss(y, p), rel=1e-12)
    assert m["n"] == 200.0
    assert m["positives"] == float(y.sum())
    assert binary_metrics(y, p, threshold=0.7)["accuracy"] == pytest.approx(
        accuracy_score(y, p >= 0.7))


def test_extreme_probabilities_give_finite_log_loss() -> None:
    """Risks of exactly 0 or 1 are clipped, so a confident mistake has a finite log-loss."""
    m = binary_metrics(np.array([0, 1, 1]), np.array([1.0, 1.0, 0.0]))
    assert math.isfinite(m["log_loss"])
    assert m["log_loss"] > 10.0


@pytest.mark.parametrize("label", [0, 1])
def test_auc_is_nan_with_one_class(label: int) -> None:
    """With one class AUC is NaN (not 0.5), without exception or warning; others defined."""
    y = np.full(10, label)
    p = np.linspace(0.1, 0.9, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics(y, p)
    assert math.isnan(m["auc"])
    assert m["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5))
    assert m["brier"] == pytest.approx(np.mean((p - label) ** 2))
    assert m["log_loss"] == pytest.approx(log_loss(y, p, labels=[0, 1]))
    assert m["positives"] == 10.0 * label


def test_empty_input_gives_nan() -> None:
    """No rows: every metric NaN, n and positives 0."""
    m = binary_metrics(np.array([], dtype=int), np.array([]))
    for key in ("auc", "accuracy", "brier", "log_loss"):
        assert math.isnan(m[key]), key
    assert (m["n"], m["positives"]) == (0.0, 0.0)


def test_mean_sd_ignores_nan() -> None:
    """Undefined values are left out; sd is the sample sd, None with a single value."""
    mean, sd, n = mean_sd([1.0, math.nan, 3.0, None])  # type: ignore[list-item]
    assert (mean, n) == (2.0, 2)
    assert sd == pytest.approx(math.sqrt(2.0))
    assert mean_sd([5.0, math.nan]) == (5.0, None, 1)
    assert mean_sd([math.nan, math.inf]) == (None, None, 0)
    assert mean_sd([]) == (None, None, 0)


def test_sigmoid_is_stable() -> None:
    """The logistic function matches scipy's expit, without overflow at extreme logits."""
    z = np.array([-1000.0, -30.0, -1.0, 0.0, 1.0, 30.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = sigmoid(z)
    np.testing.assert_allclose(out, expit(z), rtol=1e-15, atol=0)
    assert out[0] == 0.0 and out[-1] == 1.0 and out[3] == 0.5
