"""Local training of the source model on a site's training rows (one federated round)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from shared.source_model import objective


def train_local(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Train ``model`` in place with SGD, starting from the global weights it holds.

    Parameters
    ----------
    model : torch.nn.Module
        The source model, loaded with the round's global weights.
    x, y : numpy.ndarray
        Preprocessed training rows and their labels.
    epochs : int
        Passes over the rows.
    lr : float
        SGD learning rate.
    batch_size : int
        Rows per step; 0 means full batch (one step per epoch: with one epoch, FedAvg is then
        exactly gradient descent on the pooled objective).
    weight_decay : float
        L2 penalty on weights (the same in the central reference).
    proximal_mu : float
        FedProx term ``mu / 2 * ||w - w_global||^2``; 0 disables it.
    seed : int
        Seed of the mini-batch order.

    Returns
    -------
    tuple of float
        The objective of the received global model on these rows (before training) and the
        mean objective over the steps taken.
    """
    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    n = len(yt)
    if n == 0:
        raise ValueError("no training rows")
    global_params = [p.detach().clone() for p in model.parameters()]
    model.train()
    with torch.no_grad():
        start_loss = float(objective(model, xt, yt, weight_decay))
    params = list(model.parameters())
    rng = np.random.default_rng(seed)
    size = n if batch_size <= 0 else min(batch_size, n)
    losses = []
    for _ in range(epochs):
        order = rng.permutation(n) if size < n else np.arange(n)
        for start in range(0, n, size):
            idx = torch.as_tensor(order[start:start + size])
            for p in params:
                p.grad = None
            loss = objective(model, xt[idx], yt[idx], weight_decay)
            if proximal_mu > 0:
                prox = sum(
                    ((p - g) ** 2).sum()
                    for p, g in zip(model.parameters(), global_params, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            # Plain SGD by hand: torch.optim's first use imports torch._dynamo, which is slow,
            # and a deployed site starts a fresh process for every message.
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.sub_(lr * p.grad)
            losses.append(float(loss.detach()))
    return start_loss, float(np.mean(losses))


def dp_schedule(n: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """DP-SGD's sample rate and steps per round for ``n`` rows (what the accountant is told).

    Poisson sampling with rate ``q = batch_size / n`` (``q = 1``, every row each step, for the
    full batch, batch-size 0), ``round(1 / q)`` steps per epoch.
    """
    if n <= 0:
        raise ValueError("no training rows")
    q = 1.0 if batch_size <= 0 or batch_size >= n else batch_size / n
    return q, epochs * max(1, round(1.0 / q))


def train_local_dp(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    proximal_mu: float,
    clip: float,
    noise_multiplier: float,
    entropy: int | None = None,
) -> None:
    """DP-SGD with Opacus: train ``model`` in place on per-patient clipped, noised gradients.

    Each step samples every row independently with probability ``q`` (Poisson sampling, as
    Opacus' RDP accountant assumes; see :func:`dp_schedule`). Opacus' ``GradSampleModule``
    computes each sampled row's gradient of its log-loss and its ``DPOptimizer`` scales each
    to L2 norm at most ``clip`` (over all parameters together), sums them and adds Gaussian
    noise of standard deviation ``noise_multiplier * clip``; the sum is then divided by the
    expected batch ``q * n``. The weight decay (on weights, not biases, as in
    :func:`train_local`) and the FedProx term depend on no row and are added exactly before
    the plain SGD step.

    ``entropy`` seeds the sampling and the noise; None (always, outside tests) draws it from
    the operating system, so nobody else can know or reproduce the noise.
    """
    import secrets
    import warnings

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    n = len(yt)
    q, steps = dp_schedule(n, batch_size, epochs)
    seed = secrets.randbits(63) if entropy is None else entropy
    rng = np.random.default_rng(seed)
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    params = dict(model.named_parameters())
    global_params = {k: p.detach().clone() for k, p in params.items()}
    # Summed losses: a step whose Poisson sample is empty still adds its noise.
    sampled = GradSampleModule(model, loss_reduction="sum")
    optimizer = DPOptimizer(torch.optim.SGD(sampled.parameters(), lr=lr),
                            noise_multiplier=noise_multiplier, max_grad_norm=clip,
                            expected_batch_size=None, loss_reduction="sum",
                            generator=noise_gen)
    sampled.train()
    with warnings.catch_warnings():
        # Opacus' hooks fire on module outputs: the inputs (patient rows) need no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        _dp_steps(sampled, optimizer, params, global_params, xt, yt, rng, q, steps,
                  weight_decay, proximal_mu)


def _dp_steps(sampled: Any, optimizer: Any, params: dict[str, nn.Parameter],
              global_params: dict[str, torch.Tensor], xt: torch.Tensor, yt: torch.Tensor,
              rng: np.random.Generator, q: float, steps: int, weight_decay: float,
              proximal_mu: float) -> None:
    """The DP-SGD steps of :func:`train_local_dp`; the hooks are removed at the end."""
    n = len(yt)
    try:
        for _ in range(steps):
            idx = np.flatnonzero(rng.random(n) < q) if q < 1.0 else np.arange(n)
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.binary_cross_entropy_with_logits(
                sampled(xt[idx]), yt[idx], reduction="sum")
            loss.backward()
            optimizer.pre_step()  # clip every row's gradient, sum, add the noise
            with torch.no_grad():
                for k, p in params.items():
                    assert p.grad is not None
                    p.grad /= q * n
                    if weight_decay > 0 and k.endswith("weight"):
                        p.grad += weight_decay * p
                    if proximal_mu > 0:
                        p.grad += proximal_mu * (p - global_params[k])
            optimizer.original_optimizer.step()
    finally:
        sampled.remove_hooks()
        optimizer.zero_grad(set_to_none=True)
