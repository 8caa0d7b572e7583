"""The numbers of each summed reply as one vector (what a secure sum adds up), and back.

Under secure aggregation a site sends its stats, Newton or FedAvg / FedProx reply as one
masked vector; the coordinator reads back only the federation's total. Both sides build the
vector's layout from what the message itself says (the schema's shared features, the
arrays sent), so nothing about one site's reply is needed to read the total:

- **stats**: every summary entry of the shared features and the counts of
  ``protocol.STATS_EXTRA``; a feature's spread travels as its sum of squares
  (``m2 + sum**2 / count``), which adds up where ``m2`` does not;
- **newton**: the gradient and Hessian sums, the example count and the loss sum;
- **fedavg**: each weight times the site's examples, the examples, and each training metric
  times the examples: the total divided by the examples is FedAvg's weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shared import newton, protocol
from shared.preprocessing import summary_keys
from shared.schema import Feature

KINDS = ("stats", "newton", "fedavg")
COUNTS = (".count", ".counts", ".missing")  # summary entries that count rows


def stats_keys(features: Sequence[Feature]) -> list[str]:
    """The stats reply's summed keys, in the vector's order."""
    return [*summary_keys(features), *protocol.STATS_EXTRA]


def stats_vector(metrics: Mapping[str, Any], features: Sequence[Feature]
                 ) -> np.ndarray:
    """A stats reply's numbers as one vector (spreads as sums of squares)."""
    parts = []
    for key in stats_keys(features):
        values = np.atleast_1d(np.asarray(metrics[key], dtype=np.float64))
        if key.endswith(".m2"):
            base = key.removesuffix(".m2")
            count = float(np.asarray(metrics[f"{base}.count"]).ravel()[0])
            total = float(np.asarray(metrics[f"{base}.sum"]).ravel()[0])
            values = values + (total * total / count if count > 0 else 0.0)
        parts.append(values)
    return np.concatenate(parts)


def stats_total(vector: np.ndarray, features: Sequence[Feature]
                ) -> dict[str, list[float]]:
    """The federation's stats summary from the summed vector (spreads back to ``m2``).

    Counts are rounded to whole numbers first: a count's quantisation error, tiny as it is,
    would otherwise move ``sum**2 / count``, hence ``m2``, by far more.
    """
    out: dict[str, list[float]] = {}
    at = 0
    for key in stats_keys(features):
        width = _stats_width(key, features)
        values = vector[at:at + width]
        if key.endswith(COUNTS) or key in ("rows", *protocol.STATS_EXTRA):
            values = np.rint(values)
        out[key] = [float(v) for v in values]
        at += width
    _check_length(vector, at)
    for key in [k for k in out if k.endswith(".m2")]:
        base = key.removesuffix(".m2")
        count, total = out[f"{base}.count"][0], out[f"{base}.sum"][0]
        m2 = out[key][0] - (total * total / count if count > 0 else 0.0)
        out[key] = [max(m2, 0.0)]
    return out


def newton_vector(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any]
                  ) -> np.ndarray:
    """A Newton reply (gradient and Hessian sums, examples, loss sum) as one vector."""
    return np.concatenate([np.ravel(arrays[newton.GRAD]), np.ravel(arrays[newton.HESS]),
                           [float(metrics[k]) for k in protocol.NEWTON_METRICS]])


def newton_total(vector: np.ndarray, d: int
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The summed Newton reply of a model with ``d`` weights: arrays and metrics."""
    h = d * (d + 1) // 2
    _check_length(vector, d + h + len(protocol.NEWTON_METRICS))
    arrays = {newton.GRAD: vector[:d].copy(), newton.HESS: vector[d:d + h].copy()}
    metrics = dict(zip(protocol.NEWTON_METRICS, map(float, vector[d + h:]), strict=True))
    return arrays, metrics


def fedavg_vector(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, Any],
                  order: Sequence[str]) -> np.ndarray:
    """A FedAvg reply as one vector: weights and metrics times examples, the examples."""
    n = float(metrics[protocol.NUM_EXAMPLES])
    return np.concatenate([
        *(n * np.ravel(np.asarray(arrays[name], dtype=np.float64)) for name in order),
        [n], [n * float(metrics[k]) for k in protocol.TRAIN_METRICS[1:]],
    ])


def fedavg_total(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """FedAvg's weighted mean from the summed vector: arrays (by ``shapes``) and metrics."""
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    _check_length(vector, sum(sizes) + len(protocol.TRAIN_METRICS))
    n = float(vector[sum(sizes)])
    if not n > 0:
        raise ValueError("the summed examples are not positive")
    arrays, at = {}, 0
    for (name, shape), size in zip(shapes.items(), sizes, strict=True):
        arrays[name] = (vector[at:at + size] / n).reshape(shape)
        at += size
    metrics = {protocol.NUM_EXAMPLES: n}
    for i, key in enumerate(protocol.TRAIN_METRICS[1:]):
        metrics[key] = float(vector[at + 1 + i]) / n
    return arrays, metrics


def _stats_width(key: str, features: Sequence[Feature]) -> int:
    if key.endswith(".counts"):
        name = key.removesuffix(".counts")
        return len(next(f for f in features if f.name == name).categories)
    return 1


def _check_length(vector: np.ndarray, length: int) -> None:
    if len(vector) != length:
        raise ValueError(f"the summed vector has {len(vector)} values, not {length}")
