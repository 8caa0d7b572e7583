"""Many penalised offset logistic regressions on the same rows, solved together by Newton.

A site's model choice fits every candidate (recalibration, corrections and local models at
each strength, group corrections) in every fold of its cross-validation: the same inputs
``Z``, a different offset and penalty per candidate. One L-BFGS call per candidate and fold
(``shared.correction.OffsetLogisticRegression``) spends its time in Python overhead; here all
of a fold's candidates take their Newton steps at once, as batched matrix products and one
batched solve, and stop together. The objective is the estimator's, so is the optimum.

Written by hand because neither scikit-learn nor scipy fits logistic regressions with an
offset, let alone many with different offsets and penalties in one call.
"""

from __future__ import annotations

import numpy as np

from shared.correction import _sigmoid  # the estimator's own, bit for bit

# Newton's steps stop when no weight of any candidate moves more than this.
TOLERANCE = 1e-7
MAX_ITER = 50
MAX_HALVINGS = 30


def _loss(eta: np.ndarray, y: np.ndarray, theta: np.ndarray, penalty: np.ndarray
          ) -> np.ndarray:
    """Each candidate's penalised log-loss sum, from its logits ``eta``."""
    return (np.sum(np.logaddexp(0.0, eta) - y * eta, axis=1)
            + 0.5 * np.sum(penalty * theta * theta, axis=1))


def fit_many(
    Z: np.ndarray, y: np.ndarray, bases: np.ndarray, strengths: np.ndarray,
    intercept_sd: np.ndarray, start: np.ndarray | None = None,
) -> np.ndarray:
    """Fit one offset logistic regression per row of ``bases``, all on the rows ``Z``, ``y``.

    Candidate ``c`` minimises ``sum_i logloss(y_i, bases[c, i] + b + Z_i . w)
    + ||w||^2 / (2 C_c) + b^2 / (2 s_c^2)``, the objective of
    ``shared.correction.OffsetLogisticRegression(C=C_c, intercept_sd=s_c)``; ``C_c = 0``
    fits the intercept only (``w = 0``).

    Parameters
    ----------
    Z : numpy.ndarray
        Inputs, shape ``(n, d)``.
    y : numpy.ndarray
        0/1 labels, shape ``(n,)``.
    bases : numpy.ndarray
        Offsets, shape ``(k, n)``: one row per candidate.
    strengths : numpy.ndarray
        ``C`` per candidate, shape ``(k,)``, each >= 0.
    intercept_sd : numpy.ndarray
        The intercept's prior standard deviation per candidate, shape ``(k,)``.
    start : numpy.ndarray, optional
        Starting weights ``[b, w]`` per candidate, shape ``(k, d + 1)`` (zeros by default).

    Returns
    -------
    numpy.ndarray
        ``[b, w]`` per candidate, shape ``(k, d + 1)``.
    """
    Z = np.asarray(Z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    bases = np.asarray(bases, dtype=np.float64)
    strengths = np.asarray(strengths, dtype=np.float64)
    n, d = Z.shape
    k = len(bases)
    z1 = np.hstack([np.ones((n, 1)), Z])
    use_w = strengths > 0
    penalty = np.empty((k, d + 1))
    penalty[:, 0] = 1.0 / np.asarray(intercept_sd, dtype=np.float64) ** 2
    penalty[:, 1:] = np.where(use_w, 1.0 / np.where(use_w, strengths, 1.0), 0.0)[:, None]
    mask = np.ones((k, d + 1))
    mask[~use_w, 1:] = 0.0  # intercept only: the weights stay at zero
    theta = np.zeros((k, d + 1)) if start is None else np.array(start, dtype=np.float64) * mask
    eye = np.eye(d + 1)
    frozen = (1.0 - mask)[:, :, None] * eye  # identity on the weights an intercept-only fit keeps
    # Each row's outer product, once: every Hessian is then one matrix product with the weights.
    outer = (z1[:, :, None] * z1[:, None, :]).reshape(n, (d + 1) ** 2)
    eta = bases + theta @ z1.T
    loss = _loss(eta, y, theta, penalty)
    active = np.arange(k)
    for _ in range(MAX_ITER):
        t, e, b, pen, m = theta[active], eta[active], bases[active], penalty[active], mask[active]
        p = _sigmoid(e)
        grad = ((p - y) @ z1 + pen * t) * m
        w = p * (1.0 - p)
        hess = (w @ outer).reshape(-1, d + 1, d + 1) + pen[:, :, None] * eye
        hess = hess * (m[:, :, None] * m[:, None, :]) + frozen[active]
        step = np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
        new = t - step
        new_eta = b + new @ z1.T
        new_loss = _loss(new_eta, y, new, pen)
        old = loss[active]
        worse = new_loss > old + 1e-12 * np.maximum(1.0, np.abs(old))
        for _ in range(MAX_HALVINGS):  # damped where the full step went uphill
            if not worse.any():
                break
            step[worse] /= 2.0
            new[worse] = t[worse] - step[worse]
            new_eta[worse] = b[worse] + new[worse] @ z1.T
            new_loss[worse] = _loss(new_eta[worse], y, new[worse], pen[worse])
            worse = new_loss > old + 1e-12 * np.maximum(1.0, np.abs(old))
        keep = worse[:, None]
        theta[active] = np.where(keep, t, new)
        eta[active] = np.where(keep, e, new_eta)
        loss[active] = np.where(worse, old, new_loss)
        moving = (np.max(np.abs(step), axis=1) >= TOLERANCE) & ~worse
        active = active[moving]
        if not len(active):
            break
    return theta
