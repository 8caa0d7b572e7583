"""Local training of the source model on a site's training rows (one federated round)."""

from __future__ import annotations

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
