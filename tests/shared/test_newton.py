"""The Newton sums a site sends and the step the coordinator solves from them."""

from __future__ import annotations

import numpy as np
import torch

from shared import newton
from shared.source_model import build_model, load_arrays, objective


def _data(n: int = 60, d: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = (rng.random(n) < 1 / (1 + np.exp(-x[:, 0]))).astype(float)
    return x, y, rng.normal(scale=0.3, size=d + 1)


def test_sums_match_the_source_model_objective_s_derivatives() -> None:
    """Loss, gradient and Hessian sums equal torch's derivatives of the mean objective x n."""
    x, y, theta = _data()
    sums = newton.site_sums(x, y, theta)
    model = build_model("logreg", x.shape[1])
    load_arrays(model, newton.to_arrays(theta))
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    params = torch.as_tensor(theta, dtype=torch.float64)

    def mean_loss(p: torch.Tensor) -> torch.Tensor:
        z = xt @ p[:-1] + p[-1]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, yt)

    assert np.isclose(sums.loss / sums.n, float(objective(model, xt, yt, 0.0).detach()))
    grad = torch.autograd.functional.jacobian(mean_loss, params).numpy()
    hess = torch.autograd.functional.hessian(mean_loss, params).numpy()
    assert np.allclose(sums.grad / sums.n, grad, atol=1e-12)
    assert np.allclose(sums.hess / sums.n, hess, atol=1e-12)


def test_sums_over_sites_are_the_sums_over_their_pooled_rows() -> None:
    """Adding two sites' sums gives the sums of their rows together (what the coordinator uses)."""
    x, y, theta = _data()
    a, b = newton.site_sums(x[:20], y[:20], theta), newton.site_sums(x[20:], y[20:], theta)
    pooled = newton.site_sums(x, y, theta)
    both = a + b
    assert both.n == pooled.n == 60
    assert np.isclose(both.loss, pooled.loss)
    assert np.allclose(both.grad, pooled.grad) and np.allclose(both.hess, pooled.hess)


def test_packing_keeps_the_symmetric_matrix() -> None:
    """The upper triangle (d(d+1)/2 numbers) restores the whole Hessian."""
    x, y, theta = _data(d=5)
    hess = newton.site_sums(x, y, theta).hess
    packed = newton.pack(hess)
    assert packed.shape == (21,)
    assert np.allclose(newton.unpack(packed, 6), hess, rtol=0, atol=1e-12)


def test_newton_iterations_reach_the_penalised_optimum() -> None:
    """Full steps from zero reach a point where the penalised gradient vanishes."""
    x, y, _ = _data(n=200)
    theta = np.zeros(x.shape[1] + 1)
    for _ in range(8):
        theta = theta + newton.newton_direction(newton.site_sums(x, y, theta), theta, 0.01)
    sums = newton.site_sums(x, y, theta)
    grad = sums.grad / sums.n + 0.01 * newton.penalty_mask(len(theta)) * theta
    assert np.max(np.abs(grad)) < 1e-10


def test_parameters_round_trip_through_the_model_s_arrays() -> None:
    """The vector is the weights then the bias, and goes back into the same arrays."""
    theta = np.array([0.5, -1.0, 2.0, 0.25])
    arrays = newton.to_arrays(theta)
    assert arrays["net.weight"].shape == (1, 3) and arrays["net.bias"].shape == (1,)
    assert np.array_equal(newton.parameters(arrays), theta)
    assert newton.sum_shapes(arrays) == {newton.GRAD: (4,), newton.HESS: (10,)}
