"""Many offset logistic regressions solved together: each is the estimator's optimum."""

from __future__ import annotations

import numpy as np

from client.batch_fit import fit_many
from shared.correction import OffsetLogisticRegression
from shared.metrics import sigmoid


def _rows(n: int = 300, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, d))
    offset = rng.normal(size=n)
    y = (rng.random(n) < sigmoid(offset + z @ np.linspace(-1.0, 1.0, d))).astype(float)
    return z, y, offset


def test_each_candidate_is_the_estimators_fit() -> None:
    """Corrections, an intercept-only fit and a local model, solved at once.

    Each matches OffsetLogisticRegression's L-BFGS fit of the same objective.
    """
    z, y, offset = _rows()
    cases = [(0.0, 2.0, offset), (0.01, 2.0, offset), (1.0, 2.0, offset),
             (0.3, 10.0, np.zeros_like(offset))]
    theta = fit_many(z, y, np.stack([b for _, _, b in cases]),
                     np.array([c for c, _, _ in cases]), np.array([s for _, s, _ in cases]))
    for (strength, sd, base), got in zip(cases, theta, strict=True):
        ref = OffsetLogisticRegression(C=strength, intercept_sd=sd, max_iter=5000).fit(z, y, base)
        np.testing.assert_allclose(got[0], ref.intercept_, atol=1e-5)
        np.testing.assert_allclose(got[1:], ref.coef_, atol=1e-5)
    assert not np.any(theta[0, 1:])  # intercept only: the weights stay zero


def test_the_gradient_vanishes_at_the_solution() -> None:
    """At the returned weights the penalised objective's gradient is (numerically) zero."""
    z, y, offset = _rows(seed=1)
    (theta,) = fit_many(z, y, offset[None, :], np.array([0.5]), np.array([2.0]))
    eta = offset + theta[0] + z @ theta[1:]
    r = sigmoid(eta) - y
    grad = np.r_[r.sum() + theta[0] / 4.0, z.T @ r + theta[1:] / 0.5]
    assert np.max(np.abs(grad)) < 1e-6


def test_a_warm_start_reaches_the_same_optimum() -> None:
    """Starting from another candidate's weights changes the path, not the answer."""
    z, y, offset = _rows(seed=2)
    cold = fit_many(z, y, offset[None, :], np.array([0.1]), np.array([2.0]))
    warm = fit_many(z, y, offset[None, :], np.array([0.1]), np.array([2.0]),
                    start=np.full((1, z.shape[1] + 1), 3.0))
    np.testing.assert_allclose(cold, warm, atol=1e-8)
