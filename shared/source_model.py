"""The shared source model (torch): logistic regression by default, a small MLP as an option."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from shared.settings import MODELS


def build_model(kind: str, n_inputs: int, hidden_units: int = 16, seed: int = 0) -> nn.Module:
    """Create the source model with deterministic initial weights.

    Parameters
    ----------
    kind : {"logreg", "mlp"}
        Logistic regression (one linear layer, weights start at zero) or a one-hidden-layer
        ReLU network (weights drawn from ``seed``).
    n_inputs : int
        Number of input columns (the shared preprocessing's output).
    hidden_units : int
        Width of the MLP's hidden layer.
    seed : int
        Seed of the MLP's initial weights.

    Returns
    -------
    torch.nn.Module
        A module mapping ``(n, n_inputs)`` inputs to ``(n,)`` logits.
    """
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; use one of {', '.join(MODELS)}")
    if n_inputs < 1:
        raise ValueError("the source model needs at least one input column")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "logreg":
            linear = nn.Linear(n_inputs, 1)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
            model: nn.Module = _Logit(linear)
        else:
            model = _Logit(nn.Sequential(
                nn.Linear(n_inputs, hidden_units), nn.ReLU(), nn.Linear(hidden_units, 1)
            ))
    return model.double()


class _Logit(nn.Module):
    """Wrap a network so it returns one logit per row."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def objective(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float
) -> torch.Tensor:
    """Mean binary cross-entropy plus ``weight_decay / 2`` times the squared weights (not biases).

    Sites minimise this on their rows and a central fit on pooled rows minimises the same
    function, so FedAvg weighted by example counts targets the central solution.
    """
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
    if weight_decay > 0:
        penalty = sum(
            (p * p).sum() for name, p in model.named_parameters() if name.endswith("weight")
        )
        loss = loss + 0.5 * weight_decay * penalty
    return loss


def to_arrays(model: nn.Module) -> ArrayRecord:
    """The model's weights as a Flower ArrayRecord (what travels between server and sites)."""
    return ArrayRecord(model.state_dict())


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> nn.Module:
    """Load weights into ``model``; names and shapes must match exactly."""
    state = arrays.to_torch_state_dict()
    expected = model.state_dict()
    if set(state) != set(expected) or any(
        tuple(state[k].shape) != tuple(expected[k].shape) for k in expected
    ):
        got = {k: tuple(v.shape) for k, v in state.items()}
        want = {k: tuple(v.shape) for k, v in expected.items()}
        raise ValueError(f"weights do not fit the source model: got {got}, expected {want}")
    model.load_state_dict({k: v.to(torch.float64) for k, v in state.items()}, strict=True)
    return model


def predict_logit(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Logits of the model for the rows of ``x``."""
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float64)).numpy().astype(float)
