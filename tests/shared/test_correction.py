"""Tests of the offset logistic regression and the Correction record."""

import json
import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from shared.correction import (
    Correction,
    OffsetLogisticRegression,
    adapted_logit,
    correction_inputs,
)
from shared.metrics import sigmoid
from shared.preprocessing import NotFittedError, TabularPreprocessor
from shared.schema import Feature

GLUCOSE = [Feature("glucose", "numeric", scope="site")]


def _simulate(
    n: int, coef: np.ndarray, intercept: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features z, a known offset and labels drawn from offset + intercept + z . coef."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(coef)))
    offset = rng.normal(0.0, 1.0, n) + 0.5 * z[:, 0]
    y = (rng.random(n) < sigmoid(offset + intercept + z @ coef)).astype(float)
    return z, offset, y


def test_large_c_recovers_coefficient_and_intercept() -> None:
    """With a negligible penalty the fit recovers the extra coefficients and intercept."""
    coef = np.array([1.0, -0.6, 0.0])
    z, offset, y = _simulate(6000, coef, -0.5)
    model = OffsetLogisticRegression(C=1e6).fit(z, y, offset)
    np.testing.assert_allclose(model.coef_, coef, atol=0.12)
    assert model.intercept_ == pytest.approx(-0.5, abs=0.12)
    assert model.n_features_in_ == 3


def test_offset_enters_with_coefficient_one() -> None:
    """Labels that follow the offset exactly need no correction: coefficients near zero."""
    z, offset, y = _simulate(6000, np.zeros(3), 0.0, seed=1)
    model = OffsetLogisticRegression(C=1e6).fit(z, y, offset)
    np.testing.assert_allclose(model.coef_, 0.0, atol=0.1)
    assert model.intercept_ == pytest.approx(0.0, abs=0.1)


def test_c_zero_is_intercept_only() -> None:
    """C = 0 keeps every coefficient at zero and recovers a pure intercept shift."""
    z, offset, y = _simulate(6000, np.zeros(3), 0.8, seed=2)
    model = OffsetLogisticRegression(C=0.0).fit(z, y, offset)
    assert model.coef_.shape == (3,)
    assert not model.coef_.any()
    assert model.intercept_ == pytest.approx(0.8, abs=0.1)
    np.testing.assert_allclose(
        model.decision_function(z, offset), offset + model.intercept_, rtol=0, atol=1e-12
    )


def test_penalty_shrinks_coefficients() -> None:
    """A smaller C gives smaller coefficients (the ridge convention of scikit-learn)."""
    z, offset, y = _simulate(800, np.array([1.0, -0.6]), 0.0, seed=3)
    norms = [np.linalg.norm(OffsetLogisticRegression(C=c).fit(z, y, offset).coef_)
             for c in (0.001, 0.01, 0.1, 10.0)]
    assert norms == sorted(norms)
    assert norms[0] < 0.2 * norms[-1]


@pytest.mark.parametrize("label", [0.0, 1.0])
def test_single_class_gives_finite_intercept(label: float) -> None:
    """With one class the intercept prior keeps the fit finite and on the class's side."""
    z, offset, _ = _simulate(40, np.zeros(2), 0.0, seed=4)
    y = np.full(40, label)
    for c in (0.0, 1.0):
        model = OffsetLogisticRegression(C=c).fit(z, y, offset)
        assert math.isfinite(model.intercept_)
        assert np.all(np.isfinite(model.coef_))
        assert abs(model.intercept_) < 20.0
        assert (model.intercept_ > 0) == (label == 1.0)


def test_decision_function_checks_feature_count() -> None:
    """Rows with another number of features than fitted raise a ValueError."""
    z, offset, y = _simulate(100, np.zeros(3), 0.0)
    model = OffsetLogisticRegression(C=1.0).fit(z, y, offset)
    with pytest.raises(ValueError, match="expects 3 features, got 2"):
        model.decision_function(z[:, :2], offset)


@pytest.mark.parametrize("c", [-1e-9, -1.0, -math.inf, math.inf, math.nan, "1", None, True])
def test_negative_or_non_finite_c_is_an_error_at_fit(c: object) -> None:
    """C < 0, an infinite or NaN C or a non-number raise a ValueError at fit, not in __init__."""
    z, offset, y = _simulate(50, np.zeros(2), 0.0)
    model = OffsetLogisticRegression(C=c)  # type: ignore[arg-type]
    assert model.C is c  # scikit-learn's rule: __init__ stores, fit validates
    with pytest.raises(ValueError, match=r"C must be a finite number >= 0 \(0 = intercept only\)"):
        model.fit(z, y, offset)
    assert not hasattr(model, "coef_")


def test_integer_and_numpy_c_are_accepted() -> None:
    """C given as an int or a numpy float fits as the same float."""
    z, offset, y = _simulate(200, np.array([0.5, 0.0]), 0.0)
    ref = OffsetLogisticRegression(C=2.0).fit(z, y, offset).coef_
    cs: tuple[Any, ...] = (2, np.float64(2.0), np.int64(2))
    for c in cs:
        np.testing.assert_array_equal(OffsetLogisticRegression(C=c).fit(z, y, offset).coef_, ref)


def test_offset_model_clone_get_and_set_params() -> None:
    """sklearn.base.clone works fitted or not; get/set_params follow scikit-learn's contract."""
    z, offset, y = _simulate(300, np.array([0.8, -0.3]), 0.2)
    params: dict[str, Any] = {"C": 0.3, "max_iter": 200, "intercept_sd": 1.5}
    unfitted = OffsetLogisticRegression(**params)
    fitted = OffsetLogisticRegression(**params).fit(z, y, offset)
    for est in (unfitted, fitted):
        copy = clone(est)
        assert type(copy) is OffsetLogisticRegression and copy is not est
        assert copy.get_params(deep=True) == copy.get_params(deep=False) == params
        assert not hasattr(copy, "coef_")
        with pytest.raises(NotFittedError):
            copy.decision_function(z, offset)
        np.testing.assert_array_equal(copy.fit(z, y, offset).coef_, fitted.coef_)
    model = OffsetLogisticRegression()
    assert model.get_params() == {"C": 1.0, "max_iter": 500, "intercept_sd": 2.0}
    assert model.set_params(C=0.0, max_iter=50) is model
    assert (model.C, model.max_iter) == (0.0, 50)
    with pytest.raises(ValueError, match=r"\['c'\].*OffsetLogisticRegression.*'C'"):
        model.set_params(c=1.0)
    with pytest.raises(ValueError, match="invalid parameter"):
        model.set_params(alpha=1.0, C=5.0)
    assert model.C == 0.0


def _applied() -> Correction:
    rows = pd.DataFrame({"glucose": np.r_[np.nan, np.linspace(70.0, 160.0, 29)]})
    prep = TabularPreprocessor(GLUCOSE).fit(rows)
    return Correction(
        applied=True, strength=0.3, site_features=["glucose"],
        site_preprocessing=prep.to_dict(), intercept=-0.25, coef=[0.5, -0.1, 0.8, 0.3],
        feature_names=["shared:0", "shared:1", "glucose", "glucose:missing"],
        cv={"cv_log_loss_source": 0.61, "cv_log_loss": 0.55, "cv_auc": math.nan, "folds": 5.0},
    )


def test_correction_round_trip() -> None:
    """to_dict is JSON-able (NaN stored as null) and from_dict rebuilds the same correction."""
    for corr in (_applied(), Correction.none(["glucose"], reason="no benefit")):
        state = json.loads(json.dumps(corr.to_dict(), allow_nan=False))
        again = Correction.from_dict(state)
        assert again.to_dict() == corr.to_dict()
        assert (again.applied, again.strength, again.coef, again.reason) == (
            corr.applied, corr.strength, corr.coef, corr.reason)
    again = Correction.from_dict(json.loads(json.dumps(_applied().to_dict())))
    assert math.isnan(again.cv["cv_auc"])


def test_alpha_zero_when_not_applied_and_linear_when_applied() -> None:
    """Not applied adds nothing; applied adds (s - 1) * source + intercept + z . coef."""
    x = np.random.default_rng(6).normal(size=(8, 2))
    source = np.linspace(-2.0, 2.0, 8)
    rows = pd.DataFrame({"glucose": [np.nan, 80.0, 90.0, 100.0, 110.0, 120.0, 130.0, 140.0]})
    none = Correction.none(["glucose"])
    assert none.alpha(x, rows, GLUCOSE, source).tolist() == [0.0] * 8
    assert none.site_prep(GLUCOSE) is None

    corr = _applied()
    prep = corr.site_prep(GLUCOSE)
    assert prep is not None
    z = correction_inputs(x, rows, prep)
    assert z.shape == (8, 4)
    np.testing.assert_allclose(
        corr.alpha(x, rows, GLUCOSE, source), -0.25 + z @ np.array(corr.coef), rtol=0,
        atol=1e-12)
    blend = Correction.from_dict({**corr.to_dict(), "source_weight": 0.25})
    np.testing.assert_allclose(
        source + blend.alpha(x, rows, GLUCOSE, source),
        0.25 * source - 0.25 + z @ np.array(corr.coef), rtol=0, atol=1e-12)
    bad = Correction.from_dict({**corr.to_dict(), "coef": [0.5, -0.1]})
    with pytest.raises(ValueError, match="2 weights but the rows give 4 inputs"):
        bad.alpha(x, rows, GLUCOSE, source)


def test_correction_inputs_without_site_features() -> None:
    """Without site preprocessing the correction's inputs are the shared inputs."""
    x = np.arange(6.0).reshape(3, 2)
    np.testing.assert_array_equal(correction_inputs(x, pd.DataFrame(index=range(3)), None), x)


def test_adapted_logit_adds() -> None:
    """The composition is source logit plus alpha, elementwise."""
    np.testing.assert_array_equal(
        adapted_logit(np.array([0.5, -1.0, 2.0]), np.array([0.25, 1.0, -3.0])),
        np.array([0.75, 0.0, -1.0]),
    )
    assert adapted_logit(np.array([1, 2]), np.array([0, 0])).dtype == np.float64
