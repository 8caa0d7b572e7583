"""Flower's strategies, extended by one method: replies are checked before aggregation."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Strategy

from server.newton import NewtonSteps
from shared import protocol

log = logging.getLogger(__name__)

RoundHook = Callable[[int, ArrayRecord | None, MetricRecord | None, list[str]], None]

# A reply claiming more examples than this is absurd for one hospital's training rows.
MAX_EXAMPLES = 10_000_000


@dataclass(frozen=True)
class Release:
    """One round's model released under client-level DP: sites averaged, noise on the average."""

    sites: int
    noise_std: float


@dataclass
class TrainingOutcome:
    """What a training strategy learns besides each round's model; the phases read it.

    Every strategy :func:`server.strategy.make_strategy` returns carries one, as ``outcome``.

    Attributes
    ----------
    dp_spent : dict
        ``dp = "record"``: per round, per site, the (epsilon, delta) the site says it has
        spent in this run after the round.
    best : ArrayRecord or None
        Newton: the last accepted weights, the model training ends with (None: the last
        round's model is).
    converged_round : int or None
        Newton: the round it converged in (None: it did not).
    noise_multiplier : float or None
        ``dp = "client"``: the noise multiplier of the coordinator's noise.
    released : dict
        ``dp = "client"``: per round that released a model, its :class:`Release`.
    """

    dp_spent: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)
    best: ArrayRecord | None = None
    converged_round: int | None = None
    noise_multiplier: float | None = None
    released: dict[int, Release] = field(default_factory=dict)


def reply_problem(
    reply: Message, shapes: Mapping[str, tuple[int, ...]],
    metric_keys: tuple[str, ...] = protocol.TRAIN_METRICS,
) -> str | None:
    """Why a train reply must not be aggregated, or None if it is sound.

    Checks what a buggy or hostile site could send: missing or extra arrays, wrong shapes,
    NaN or infinite values, and an example count that is not a positive, plausible integer.
    ``shapes`` and ``metric_keys`` are what a sound reply holds: the source model's arrays and
    the training metrics, or, in a Newton round, the gradient and Hessian sums and the loss sum.
    """
    if reply.has_error():
        return f"error reply: {reply.error.reason}"
    content = reply.content
    if set(content.array_records) != {protocol.ARRAYS} or set(content.metric_records) != {
        protocol.METRICS
    }:
        return "reply does not hold exactly the 'arrays' and 'metrics' records"
    arrays = content.array_records[protocol.ARRAYS]
    got = {k: tuple(arrays[k].shape) for k in arrays}
    if got != dict(shapes):
        return f"array names or shapes {got} differ from the source model's {dict(shapes)}"
    for name in arrays:
        if not np.all(np.isfinite(arrays[name].numpy())):
            return f"array {name!r} holds NaN or infinite values"
    metrics = content.metric_records[protocol.METRICS]
    n = metrics.get(protocol.NUM_EXAMPLES)
    if not isinstance(n, int | float) or not math.isfinite(n) or n < 1 or n > MAX_EXAMPLES or (
        float(n) != int(n)
    ):
        return "num-examples is missing, not a positive integer, or implausibly large"
    for key in metric_keys:
        value = metrics.get(key)
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"metric {key!r} is missing or not finite"
    if protocol.UNIT_WEIGHT in metric_keys and metrics.get(protocol.UNIT_WEIGHT) != 1.0:
        # dp = "client": a site weighing more than the others would break the noise's scale.
        return f"metric {protocol.UNIT_WEIGHT!r} is not exactly 1.0 (dp = client)"
    return None


class GuardedAggregation(Strategy):
    """Mixin for a Flower strategy: check every train reply, then aggregate the sound ones.

    What the strategy learns besides each round's model is in ``outcome``.

    Parameters
    ----------
    shapes : mapping
        Array names and shapes of the source model; replies must match them exactly.
    site_names : mapping
        Site name per node id, so that logs and the report name sites, not numbers.
    on_round : callable, optional
        Called after each round with the aggregated model (None if nothing was aggregated),
        the aggregated metrics and the rejected sites.
    """

    metric_keys: tuple[str, ...] = protocol.TRAIN_METRICS

    def __init__(
        self,
        *args: object,
        shapes: Mapping[str, tuple[int, ...]],
        site_names: Mapping[int, str],
        on_round: RoundHook | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.shapes = dict(shapes)
        self.site_names = dict(site_names)
        self.on_round = on_round
        self.rejected: dict[int, list[str]] = {}
        self.outcome = TrainingOutcome()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop unsound replies (logged with the site's name), aggregate the rest."""
        sound, rejected = [], []
        for reply in replies:
            node = reply.metadata.src_node_id
            site = self.site_names.get(node, f"node {node}")
            problem = reply_problem(reply, self.shapes, self.metric_keys)
            if problem is None:
                sound.append(reply)
                spent = _dp_spent(reply)
                if spent is not None:
                    self.outcome.dp_spent.setdefault(server_round, {})[site] = spent
            else:
                log.warning("round %d: reply of site %s rejected: %s", server_round, site,
                            problem)
                rejected.append(site)
        self.rejected[server_round] = rejected
        result: tuple[ArrayRecord | None, MetricRecord | None] = (None, None)
        if sound:
            result = super().aggregate_train(server_round, sound)  # type: ignore[safe-super]
        else:
            log.warning("round %d: no sound reply; the global model is unchanged", server_round)
        if self.on_round is not None:
            self.on_round(server_round, result[0], result[1], rejected)
        return result


def _dp_spent(reply: Message) -> tuple[float, float] | None:
    """The (epsilon, delta) a DP train reply says its site has spent in this run, if any."""
    metrics = reply.content.metric_records[protocol.METRICS]
    eps, delta = (metrics.get(k) for k in protocol.DP_METRICS)
    if isinstance(eps, int | float) and isinstance(delta, int | float) and math.isfinite(eps):
        return float(eps), float(delta)
    return None


class GuardedFedAvg(GuardedAggregation, FedAvg):
    """FedAvg (weighted by examples) over checked replies."""


class GuardedFedProx(GuardedAggregation, FedProx):
    """FedProx over checked replies; sites add the proximal term."""


class GuardedFedMedian(GuardedAggregation, FedMedian):
    """Coordinate-wise median of checked replies: one wildly wrong site cannot move it far."""


class GuardedFedTrimmedAvg(GuardedAggregation, FedTrimmedAvg):
    """Trimmed mean of checked replies (``trim-beta`` of the sites cut at each end)."""


class GuardedNewton(GuardedAggregation, NewtonSteps):
    """Damped Newton steps from checked gradient and Hessian sums (logistic model only)."""

    metric_keys = protocol.NEWTON_METRICS

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies and step; nothing once converged (no message was sent)."""
        if self.finished:
            return None, None
        result = super().aggregate_train(server_round, replies)
        self.outcome.best = self.best
        self.outcome.converged_round = self.converged_round
        return result
