"""The training strategy of a run: Flower's, as the settings name it, with replies checked."""

from __future__ import annotations

import math
from collections.abc import Mapping

from server.client_dp import GuardedClientSideDP, wrap
from server.guarded import (
    GuardedAggregation,
    GuardedFedAvg,
    GuardedFedMedian,
    GuardedFedProx,
    GuardedFedTrimmedAvg,
    GuardedNewton,
    RoundHook,
)
from shared import newton, protocol
from shared.settings import RunSettings, SettingsError

# What make_strategy returns: a Flower strategy carrying its ``outcome``.
TrainingStrategy = GuardedAggregation | GuardedClientSideDP


def make_strategy(
    settings: RunSettings,
    n_sites: int,
    shapes: Mapping[str, tuple[int, ...]],
    site_names: Mapping[int, str],
    on_round: RoundHook | None = None,
) -> TrainingStrategy:
    """The strategy named in the settings, training on every healthy site each round.

    Federated evaluation during training is off: phase 4 evaluates once, on held-out rows.
    Under ``dp = "client"`` the FedAvg / FedProx strategy averages uniformly
    (``unit-weight``) and is wrapped in Flower's client-side fixed clipping
    (``server.client_dp``), which then calls ``on_round``.

    Parameters
    ----------
    settings : RunSettings
        The run's settings (``strategy``, ``dp`` and theirs).
    n_sites : int
        Sites that passed the stats phase.
    shapes : mapping
        Array names and shapes of the source model.
    site_names : mapping
        Site name per node id.
    on_round : callable, optional
        Called after each round (:data:`server.guarded.RoundHook`).

    Returns
    -------
    GuardedAggregation or GuardedClientSideDP
        A Flower strategy; what it learns besides the model is in its ``outcome``
        (:class:`server.guarded.TrainingOutcome`).

    Raises
    ------
    SettingsError
        For client-level DP with a strategy other than FedAvg or FedProx.
    """
    client_dp = settings.dp == "client"
    if client_dp and settings.training not in ("fedavg", "fedprox"):
        raise SettingsError(f"dp = client needs strategy fedavg or fedprox, not "
                            f"{settings.training}")
    classes: dict[str, type[GuardedAggregation]] = {
        "fedavg": GuardedFedAvg, "fedprox": GuardedFedProx, "fedmedian": GuardedFedMedian,
        "fedtrimmedavg": GuardedFedTrimmedAvg, "newton": GuardedNewton,
    }
    extra: dict[str, float | bool] = {
        "fedprox": {"proximal_mu": settings.proximal_mu},
        "fedtrimmedavg": {"beta": settings.trim_beta},
        "newton": {"weight_decay": settings.weight_decay,
                   "tolerance": settings.newton_tolerance, "noisy": settings.dp == "record"},
    }.get(settings.training, {})
    if settings.training == "newton":  # replies hold the sums, sized by the model's weights
        d = sum(math.prod(shape) for shape in shapes.values())
        shapes = {newton.GRAD: (d,), newton.HESS: (d * (d + 1) // 2,)}
    # Every healthy site trains each round; the strategy may go on with as few as min-sites
    # (the grid ends the run, with a clear error, below that).
    minimum = min(settings.min_sites, n_sites)
    strategy = classes[settings.training](
        shapes=shapes, site_names=site_names, on_round=None if client_dp else on_round,
        fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=minimum,
        min_available_nodes=minimum,
        weighted_by_key=protocol.UNIT_WEIGHT if client_dp else protocol.NUM_EXAMPLES,
        arrayrecord_key=protocol.ARRAYS, configrecord_key=protocol.CONFIG, **extra,
    )
    if client_dp:
        strategy.metric_keys = (*protocol.TRAIN_METRICS, *protocol.CLIENT_DP_METRICS)
        return wrap(settings, strategy, n_sites, on_round)
    return strategy
