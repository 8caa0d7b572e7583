"""Second-order training of the logistic source model: the sums a site sends, the step solved.

A site sends, at the weights it received, the sums over its training rows of the logistic loss,
its gradient and its Hessian (``d + d(d+1)/2`` numbers for ``d`` parameters, the Hessian as its
upper triangle). Sums, not means: the coordinator adds them over sites, so calibrated noise or
secure aggregation can later act on each sum as it is. The coordinator adds the L2 penalty
(the same objective as ``shared.source_model.objective``) and solves for the step.

Numpy only: a deployed site starts a fresh process per message, and this needs no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

GRAD = "newton.grad"
HESS = "newton.hess"
# The logistic source model's arrays (torch state_dict of shared.source_model's _Logit).
WEIGHT = "net.weight"
BIAS = "net.bias"


def parameters(arrays: ArrayRecord) -> np.ndarray:
    """The model's parameters as one vector: the input weights, then the bias.

    Raises
    ------
    ValueError
        If the arrays are not those of the logistic source model.
    """
    if set(arrays) != {WEIGHT, BIAS}:
        raise ValueError("Newton training needs the logistic source model (model = logreg); "
                         f"got arrays {sorted(arrays)}")
    weight = arrays[WEIGHT].numpy().astype(np.float64)
    bias = arrays[BIAS].numpy().astype(np.float64)
    if weight.ndim != 2 or weight.shape[0] != 1 or bias.shape != (1,):
        raise ValueError("the logistic model's weight must be (1, d) and its bias (1,)")
    return np.concatenate([weight[0], bias])


def to_arrays(theta: np.ndarray) -> ArrayRecord:
    """The parameter vector as the logistic source model's arrays."""
    theta = np.asarray(theta, dtype=np.float64)
    return ArrayRecord({WEIGHT: Array(theta[:-1].reshape(1, -1).copy()),
                        BIAS: Array(theta[-1:].copy())})


def sum_shapes(arrays: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a site's Newton reply for the model held in ``arrays``."""
    d = int(sum(int(np.prod(arrays[k].shape)) for k in arrays))
    return {GRAD: (d,), HESS: (d * (d + 1) // 2,)}


def pack(hessian: np.ndarray) -> np.ndarray:
    """The upper triangle of a symmetric matrix, row by row."""
    return hessian[np.triu_indices(hessian.shape[0])]


def unpack(packed: np.ndarray, d: int) -> np.ndarray:
    """The symmetric ``d x d`` matrix whose upper triangle is ``packed``."""
    out = np.zeros((d, d))
    out[np.triu_indices(d)] = packed
    return out + np.triu(out, 1).T


@dataclass(frozen=True)
class Sums:
    """Sums over rows of the logistic loss, its gradient and its Hessian, and the row count."""

    loss: float
    grad: np.ndarray
    hess: np.ndarray  # full d x d
    n: int

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.loss + other.loss, self.grad + other.grad, self.hess + other.hess,
                    self.n + other.n)


def site_sums(x: np.ndarray, y: np.ndarray, theta: np.ndarray,
              offset: np.ndarray | None = None) -> Sums:
    """The sums of one site's rows at parameters ``theta`` (no penalty: the coordinator adds it).

    Parameters
    ----------
    x : numpy.ndarray
        Preprocessed training rows, shape ``(n, d - 1)``.
    y : numpy.ndarray
        Their 0/1 labels.
    theta : numpy.ndarray
        Input weights then bias, shape ``(d,)``.
    offset : numpy.ndarray, optional
        A fixed logit per row added to the model's (a group extension's: the frozen source
        model's logit).
    """
    x1 = np.hstack([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))])
    z = x1 @ theta if offset is None else x1 @ theta + np.asarray(offset, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    loss = float(np.sum(np.logaddexp(0.0, z) - y * z))
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow
    grad = x1.T @ (p - y)
    hess = (x1 * (p * (1.0 - p))[:, None]).T @ x1
    return Sums(loss, grad, hess, len(y))


def clipped_site_sums(
    x: np.ndarray, y: np.ndarray, theta: np.ndarray, clip: float, hess_clip: float,
    loss_bound: float, offset: np.ndarray | None = None,
) -> Sums:
    """The sums of :func:`site_sums` with every row's contribution bounded (record-level DP).

    Row ``i`` adds its gradient ``(p_i - y_i) x_i`` scaled to L2 norm at most ``clip``, its
    Hessian ``p_i (1 - p_i) x_i x_i^T`` scaled to Frobenius norm at most ``hess_clip`` (so its
    packed upper triangle too) and its log-loss clipped to ``[0, loss_bound]``: removing a row
    changes each sum by at most its bound. Neither is ever formed per row. ``offset`` as in
    :func:`site_sums`.
    """
    x1 = np.hstack([np.asarray(x, dtype=np.float64), np.ones((len(x), 1))])
    z = x1 @ theta if offset is None else x1 @ theta + np.asarray(offset, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    loss = np.minimum(np.logaddexp(0.0, z) - y * z, loss_bound)
    p = 0.5 * (1.0 + np.tanh(0.5 * z))
    sq = np.einsum("ij,ij->i", x1, x1)  # ||x_i||^2
    r = p - y
    g_norm = np.abs(r) * np.sqrt(sq)
    r = r * np.minimum(1.0, clip / np.maximum(g_norm, 1e-300))
    w = p * (1.0 - p)
    h_norm = w * sq  # the Frobenius norm of a rank-one w x x^T
    w = w * np.minimum(1.0, hess_clip / np.maximum(h_norm, 1e-300))
    return Sums(float(np.sum(loss)), x1.T @ r, (x1 * w[:, None]).T @ x1, len(y))


def noised_sums(sums: Sums, noise_multiplier: float, bounds: tuple[float, float, float],
                rng: np.random.Generator) -> tuple[float, np.ndarray, np.ndarray]:
    """One Gaussian mechanism on the bounded sums: (loss, gradient, packed Hessian) noised.

    ``bounds`` are the per-row bounds of the gradient, the Hessian and the loss. Each part
    divided by its bound, the three together change by at most ``sqrt(3)`` in L2 when a row
    is removed, so each part gets noise of standard deviation
    ``noise_multiplier * sqrt(3) * bound``: an ``noise_multiplier``-Gaussian mechanism on the
    whole reply, as the accountant counts it (one step, sample rate 1, per round).
    """
    g_bound, h_bound, l_bound = bounds
    scale = noise_multiplier * math.sqrt(3.0)
    packed = pack(sums.hess)
    grad = sums.grad + rng.normal(0.0, scale * g_bound, size=sums.grad.shape)
    hess = packed + rng.normal(0.0, scale * h_bound, size=packed.shape)
    loss = sums.loss + float(rng.normal(0.0, scale * l_bound))
    return loss, grad, hess


def floor_eigenvalues(hess: np.ndarray, floor: float) -> np.ndarray:
    """The symmetric matrix nearest ``hess`` whose eigenvalues are all at least ``floor``."""
    sym = 0.5 * (hess + hess.T)
    values, vectors = np.linalg.eigh(sym)
    return (vectors * np.maximum(values, floor)) @ vectors.T


def penalty_mask(d: int) -> np.ndarray:
    """1 for the input weights, 0 for the bias (the penalty spares the bias)."""
    mask = np.ones(d)
    mask[-1] = 0.0
    return mask


def objective(sums: Sums, theta: np.ndarray, weight_decay: float) -> float:
    """Mean logistic loss plus ``weight_decay / 2`` times the squared input weights."""
    mask = penalty_mask(len(theta))
    return sums.loss / sums.n + 0.5 * weight_decay * float(np.sum(mask * theta * theta))


def newton_direction(sums: Sums, theta: np.ndarray, weight_decay: float,
                     noisy: bool = False) -> np.ndarray:
    """The Newton direction of the penalised mean objective at ``theta``.

    The Hessian of the mean loss plus the penalty is positive semi-definite; a tiny ridge
    (relative to its scale) keeps the solve defined when a parameter has no signal (a column
    that is constant over every site's rows). With ``noisy`` (sums under differential
    privacy) the Hessian may have lost that: its eigenvalues are raised to at least a tenth
    of their mean (a damped step, always downhill for the noisy gradient).
    """
    mask = penalty_mask(len(theta))
    grad = sums.grad / sums.n + weight_decay * mask * theta
    hess = sums.hess / sums.n + np.diag(weight_decay * mask)
    if noisy:
        hess = floor_eigenvalues(hess, max(0.1 * float(np.trace(hess)) / len(theta), 1e-6))
    ridge = 1e-10 * max(1.0, float(np.trace(hess)) / len(theta))
    hess = hess + ridge * np.eye(len(theta))
    try:
        return -np.linalg.solve(hess, grad)
    except np.linalg.LinAlgError:
        return -np.linalg.lstsq(hess, grad, rcond=None)[0]


def sums_from_reply(arrays: Mapping[str, np.ndarray], loss: float, n: int) -> Sums:
    """A site's sums from the arrays and numbers of its reply."""
    grad = np.asarray(arrays[GRAD], dtype=np.float64)
    return Sums(float(loss), grad, unpack(np.asarray(arrays[HESS], dtype=np.float64), len(grad)),
                int(n))
