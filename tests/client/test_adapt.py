"""Tests of a site's model choice: source, corrections, local-only and blends, by CV; do-no-harm."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from client.adapt import MIN_CLASS_ROWS, fit_correction
from shared.correction import Correction, OffsetLogisticRegression, correction_inputs
from shared.metrics import sigmoid
from shared.preprocessing import TabularPreprocessor
from shared.schema import Feature

GLUCOSE = [Feature("glucose", "numeric", unit="mg/dL", scope="site", required=False)]
SOURCE_BETA = np.array([0.8, -0.5, 0.3])


def _site(
    n: int, site_effect: float, seed: int
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, np.ndarray]:
    """Shared inputs, glucose rows (5 % missing), the source's offset and labels.

    Labels follow ``offset + site_effect * standardised glucose``: the offset (the source
    model's logit) ignores glucose, which only this site measures.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    offset = x @ SOURCE_BETA - 0.5
    glucose = rng.normal(105.0, 15.0, n)
    y = (rng.random(n) < sigmoid(offset + site_effect * (glucose - 105.0) / 15.0)).astype(int)
    glucose[rng.random(n) < 0.05] = np.nan
    return x, pd.DataFrame({"glucose": glucose}), offset, y


def _subset(
    site: tuple[np.ndarray, pd.DataFrame, np.ndarray, np.ndarray], idx: np.ndarray
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray, np.ndarray]:
    x, rows, offset, y = site
    return x[idx], rows.iloc[idx].reset_index(drop=True), offset[idx], y[idx]


def test_site_feature_effect_is_learned() -> None:
    """Labels driven by a site feature the source ignores: a model using it, by clear evidence."""
    x, rows, offset, y = _site(600, 1.5, seed=0)
    corr = fit_correction(x, rows, offset, y, GLUCOSE, seed=0)
    assert corr.applied
    assert corr.strength is not None and corr.strength > 0
    assert corr.cv["cv_log_loss_source"] - corr.cv["cv_log_loss"] > corr.cv["cv_log_loss_se"]
    assert corr.cv["cv_auc"] > corr.cv["cv_auc_source"]
    assert corr.site_features == ["glucose"]
    assert corr.feature_names == ["shared:0", "shared:1", "shared:2", "glucose",
                                  "glucose:missing"]
    glucose_weight = corr.coef[corr.feature_names.index("glucose")]
    assert glucose_weight > 0.5
    assert corr.choice.startswith(("correction", "local", "blend"))
    assert corr.reason.startswith(corr.choice) and "standard error" in corr.reason
    chosen = next(e for e in corr.evidence if e["candidate"] == corr.choice)
    best = min(e["cv_log_loss"] for e in corr.evidence if e["gain"] > e["se"])
    assert chosen["cv_log_loss"] == best  # the lowest of the clear winners


def test_local_only_model_is_chosen_where_the_source_is_wrong() -> None:
    """A source model that ranks backwards at this site: the site goes alone (s = 0)."""
    x, rows, offset, y = _site(800, 1.5, seed=8)
    corr = fit_correction(x, rows, -offset, y, GLUCOSE, seed=8)
    assert corr.applied and corr.choice.startswith("local")
    assert corr.source_weight == 0.0
    assert corr.cv["cv_auc"] > 0.7 > corr.cv["cv_auc_source"]
    # Its logits do not depend on the (wrong) source model any more.
    np.testing.assert_allclose(-offset + corr.alpha(x, rows, GLUCOSE, -offset),
                               offset + 5.0 + corr.alpha(x, rows, GLUCOSE, offset + 5.0))


def test_do_no_harm_when_offset_is_true_logit() -> None:
    """With no site effect the correction is off or intercept-only in (almost) every seed."""
    strengths = []
    for seed in range(5):
        x, rows, offset, y = _site(400, 0.0, seed=seed)
        corr = fit_correction(x, rows, offset, y, GLUCOSE, seed=seed)
        if corr.applied:
            assert corr.cv["cv_log_loss"] <= corr.cv["cv_log_loss_source"]
        else:
            assert corr.strength is None and corr.coef == [] and corr.reason
            assert corr.cv["cv_log_loss"] == corr.cv["cv_log_loss_source"]
        strengths.append(corr.strength if corr.applied else None)
    feature_corrections = [s for s in strengths if s is not None and s > 0]
    assert len(feature_corrections) <= 1, strengths


def test_fewer_than_two_rows_of_a_class_recalibrates_prevalence() -> None:
    """One positive row: intercept-only recalibration towards the low prevalence, finite."""
    x, rows, _, _ = _site(30, 0.0, seed=1)
    y = np.zeros(30, dtype=int)
    y[3] = 1
    corr = fit_correction(x, rows, np.zeros(30), y, GLUCOSE, seed=0)
    assert corr.applied and corr.strength == 0.0 and corr.choice == "recalibration"
    assert not any(corr.coef)
    assert math.isfinite(corr.intercept) and corr.intercept < -1.0
    assert all(math.isfinite(v) for k, v in corr.cv.items() if k != "cv_auc")
    assert corr.cv["cv_log_loss"] < corr.cv["cv_log_loss_source"]
    alpha = corr.alpha(x, rows, GLUCOSE, np.zeros(30))
    assert np.all(np.isfinite(alpha))


def test_single_class_shifts_risk_towards_it() -> None:
    """Thirty positive rows and no negative: the intercept-only correction raises every risk."""
    x, rows, _, _ = _site(30, 0.0, seed=2)
    offset = np.linspace(-1.0, 1.0, 30)
    corr = fit_correction(x, rows, offset, np.ones(30, dtype=int), GLUCOSE, seed=0)
    assert corr.applied and corr.strength == 0.0 and corr.choice == "recalibration"
    assert not any(corr.coef)
    alpha = corr.alpha(x, rows, GLUCOSE, offset)
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    assert np.all(sigmoid(offset + alpha) > sigmoid(offset))
    assert math.isnan(corr.cv["cv_auc_source"])


def test_tiny_site_gives_no_correction() -> None:
    """A single training row cannot be cross-validated: the source model, with a reason."""
    x, rows, offset, _ = _site(1, 0.0, seed=3)
    corr = fit_correction(x, rows, offset, np.array([1]), GLUCOSE)
    assert not corr.applied and corr.strength is None and corr.choice == "source"
    assert "1 training row" in corr.reason


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_class_never_gets_a_feature_correction(seed: int) -> None:
    """Fewer than MIN_CLASS_ROWS positives: even a strong site effect gets no feature weights."""
    big = _site(3000, 3.0, seed=seed)
    y = big[3]
    n_pos = MIN_CLASS_ROWS - 1
    idx = np.r_[np.flatnonzero(y == 1)[:n_pos], np.flatnonzero(y == 0)[:300]]
    x, rows, offset, y = _subset(big, idx)
    assert y.sum() == n_pos
    corr = fit_correction(x, rows, offset, y, GLUCOSE, seed=seed)
    assert corr.strength in (0.0, None)
    assert not any(corr.coef)

    # The same site with MIN_CLASS_ROWS positives may use its feature (and here it does).
    idx = np.r_[np.flatnonzero(big[3] == 1)[:4 * MIN_CLASS_ROWS], np.flatnonzero(big[3] == 0)[:300]]
    x, rows, offset, y = _subset(big, idx)
    corr = fit_correction(x, rows, offset, y, GLUCOSE, seed=seed)
    assert corr.strength is not None and corr.strength > 0


def test_round_trip_and_alpha_reproduce_fitted_logits() -> None:
    """from_dict(to_dict()) gives the same alpha, equal to the refitted model's logits."""
    x, rows, offset, y = _site(600, 1.5, seed=4)
    corr = fit_correction(x, rows, offset, y, GLUCOSE, seed=4)
    assert corr.applied and corr.strength is not None
    again = Correction.from_dict(json.loads(json.dumps(corr.to_dict(), allow_nan=False)))
    assert (again.choice, again.source_weight, again.evidence) == (
        corr.choice, corr.source_weight, json.loads(json.dumps(corr.to_dict()))["evidence"])
    alpha = corr.alpha(x, rows, GLUCOSE, offset)
    np.testing.assert_array_equal(again.alpha(x, rows, GLUCOSE, offset), alpha)

    prep = TabularPreprocessor(GLUCOSE).fit(rows)
    assert corr.site_preprocessing == prep.to_dict()
    z = correction_inputs(x, rows, prep)
    s = corr.source_weight
    local = s < 1.0
    model = OffsetLogisticRegression(C=corr.strength, intercept_sd=10.0 if local else 2.0)
    model.fit(z, y, np.zeros(len(y)) if local else offset)

    def expected(z_rows: np.ndarray, base: np.ndarray) -> np.ndarray:
        if not local:
            return model.decision_function(z_rows, base)
        return s * base + (1 - s) * model.decision_function(z_rows, np.zeros(len(base)))

    # The site solves the estimator's objective by Newton (client.batch_fit), the reference
    # by L-BFGS: the same optimum, to L-BFGS's tolerance.
    np.testing.assert_allclose(offset + alpha, expected(z, offset), rtol=0, atol=1e-5)
    # New rows (with a missing glucose) are scored the same way.
    new_x, new_rows, new_offset, _ = _site(20, 1.5, seed=99)
    np.testing.assert_allclose(
        new_offset + again.alpha(new_x, new_rows, GLUCOSE, new_offset),
        expected(correction_inputs(new_x, new_rows, prep), new_offset), rtol=0, atol=1e-5,
    )


def test_deterministic_for_a_seed_and_uses_only_given_rows() -> None:
    """Same training arrays and seed give the same correction (held-out rows never passed)."""
    x, rows, offset, y = _site(300, 1.0, seed=5)
    a = fit_correction(x, rows, offset, y, GLUCOSE, seed=11)
    b = fit_correction(x.copy(), rows.copy(), offset.copy(), y.copy(), GLUCOSE, seed=11)
    assert a.to_dict() == b.to_dict()


def test_no_site_features() -> None:
    """A site without its own features corrects on the shared inputs only."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 3))
    offset = x @ SOURCE_BETA
    y = (rng.random(500) < sigmoid(offset + 1.5 * x[:, 2])).astype(int)
    corr = fit_correction(x, pd.DataFrame(index=range(500)), offset, y, [], seed=0)
    assert corr.applied and corr.site_preprocessing is None
    assert corr.feature_names == ["shared:0", "shared:1", "shared:2"]
    assert corr.coef[2] > 0.5
