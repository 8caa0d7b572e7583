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
            # Plain SGD by hand: torch.optim's first use imports torch._dynamo (~1 s), and a
            # deployed site starts a fresh process for every message.
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
    """DP-SGD: train ``model`` in place on per-patient clipped, noised gradients.

    Each step samples every row independently with probability ``q`` (Poisson sampling, as
    Opacus' RDP accountant assumes; see :func:`dp_schedule`), computes each sampled row's
    gradient of its log-loss (``torch.func``: vmap of grad), scales it to L2 norm at most
    ``clip``, sums them, adds Gaussian noise of standard deviation ``noise_multiplier * clip``
    to every coordinate and divides by the expected batch ``q * n``. The weight decay and the
    FedProx term depend on no row and are added exactly. Plain SGD as in :func:`train_local`.

    ``entropy`` seeds the sampling and the noise; None (always, outside tests) draws it from
    the operating system, so nobody else can know or reproduce the noise.
    """
    import secrets

    from torch.func import functional_call, grad, vmap

    xt = torch.as_tensor(x, dtype=torch.float64)
    yt = torch.as_tensor(y, dtype=torch.float64)
    n = len(yt)
    q, steps = dp_schedule(n, batch_size, epochs)
    seed = secrets.randbits(63) if entropy is None else entropy
    rng = np.random.default_rng(seed)
    noise_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    names = [name for name, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    global_params = {k: p.detach().clone() for k, p in params.items()}
    model.train()

    def one_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logit = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.binary_cross_entropy_with_logits(logit, yi.unsqueeze(0))

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))
    for _ in range(steps):
        idx = np.flatnonzero(rng.random(n) < q) if q < 1.0 else np.arange(n)
        current = {k: p.detach() for k, p in params.items()}
        summed = clipped_sum(per_example, current, xt[idx], yt[idx], clip) if len(idx) else {
            k: torch.zeros_like(v) for k, v in current.items()}
        with torch.no_grad():
            for k in names:
                p = params[k]
                noise = torch.normal(0.0, noise_multiplier * clip, size=p.shape,
                                     generator=noise_gen, dtype=p.dtype)
                g = (summed[k] + noise) / (q * n)
                if weight_decay > 0 and k.endswith("weight"):
                    g = g + weight_decay * p
                if proximal_mu > 0:
                    g = g + proximal_mu * (p - global_params[k])
                p.sub_(lr * g)


def clipped_sum(per_example: Any, params: dict[str, torch.Tensor], x: torch.Tensor,
                y: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """The sum over rows of each row's gradient scaled to L2 norm at most ``clip``.

    The norm is over all the model's parameters together; one row changes the sum by at
    most ``clip`` (its sensitivity).
    """
    grads = per_example(params, x, y)
    flat = torch.cat([g.reshape(len(x), -1) for g in grads.values()], dim=1)
    factor = torch.clamp(clip / (flat.norm(dim=1) + 1e-12), max=1.0)
    return {k: torch.einsum("i,i...->...", factor, g) for k, g in grads.items()}
