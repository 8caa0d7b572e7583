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


def test_calibration_slope_and_intercept_of_known_miscalibration() -> None:
    """Well calibrated: slope 1, intercept 0; doubled logits: slope 1/2; shifted: intercept."""
    from shared.metrics import calibration

    rng = np.random.default_rng(3)
    logit = rng.normal(size=20000)
    y = (rng.random(20000) < sigmoid(logit)).astype(int)
    slope, intercept = calibration(y, sigmoid(logit))
    assert slope == pytest.approx(1.0, abs=0.05) and intercept == pytest.approx(0.0, abs=0.05)
    assert calibration(y, sigmoid(2 * logit))[0] == pytest.approx(0.5, abs=0.03)
    assert calibration(y, sigmoid(logit + 1.0))[1] == pytest.approx(-1.0, abs=0.06)


def test_reliability_bins_hold_at_least_ten_rows_and_no_row() -> None:
    """Quantile bins of >= 10 rows; 19 rows give no curve; only bin means and counts."""
    from shared.metrics import MIN_BIN_ROWS, reliability

    rng = np.random.default_rng(4)
    p = rng.random(57)
    y = (rng.random(57) < p).astype(int)
    curve = reliability(y, p)
    assert len(curve["rows"]) == 5 and min(curve["rows"]) >= MIN_BIN_ROWS
    assert sum(curve["rows"]) == 57 and curve["predicted"] == sorted(curve["predicted"])
    assert reliability(y[:19], p[:19]) == {"predicted": [], "observed": [], "rows": []}


def test_paired_bootstrap_interval_covers_a_difference_and_is_paired() -> None:
    """A better score's lead has an interval above zero; identical scores give zero width."""
    from shared.metrics import paired_auc_difference

    rng = np.random.default_rng(5)
    x = rng.normal(size=400)
    y = (rng.random(400) < sigmoid(2 * x)).astype(int)
    good, noisy = x, x + rng.normal(scale=2.0, size=400)
    diff, low, high = paired_auc_difference(y, sigmoid(good), sigmoid(noisy), seed=1)
    assert 0 < low < diff < high
    same = paired_auc_difference(y, sigmoid(good), sigmoid(good), seed=1)
    assert same == (0.0, 0.0, 0.0)
    assert all(math.isnan(v) for v in paired_auc_difference(np.ones(9), good[:9], x[:9]))


def test_rank_auc_is_scikit_learn_s_auc_with_ties() -> None:
    """The Mann-Whitney AUC equals roc_auc_score, ties included; NaN with one class."""
    from sklearn.metrics import roc_auc_score

    from shared.metrics import rank_auc

    rng = np.random.default_rng(1)
    for _ in range(50):
        y = (rng.random(60) < 0.3).astype(int)
        y[:2] = [0, 1]
        score = np.round(rng.normal(size=60), 1)  # many ties
        assert abs(rank_auc(y, score) - roc_auc_score(y, score)) < 1e-12
    assert np.isnan(rank_auc(np.zeros(5), np.arange(5.0)))
