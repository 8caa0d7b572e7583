"""Client-level differential privacy at the coordinator (``dp = "client"``).

A guarantee per site: the models the coordinator releases (each round's average, and so the
final source model) are (epsilon, delta)-differentially private with respect to adding or
removing one whole site's data. Not against the coordinator itself, which sees each site's
clipped update before the noise.

- Each site clips its model update (trained minus received weights) to L2 norm ``dp-clip``
  inside its train job (``client.jobs.clip_update``, Flower's ``compute_clip_model_update``).
- The coordinator averages the sound updates with equal weights (FedAvg's ``weighted_by_key``
  is ``unit-weight``, which every site sends as exactly 1.0, checked in
  ``server.guarded.reply_problem``) and Flower's ``DifferentialPrivacyClientSideFixedClipping``
  adds Gaussian noise of standard deviation ``z * dp-clip / m`` to the average of ``m`` sites
  (``flwr.supercore.differential_privacy.compute_stdv``, numpy's global generator): the
  Gaussian mechanism with noise multiplier ``z`` on the sum, whose sensitivity to one site is
  ``dp-clip``. ``m`` is the number of sound replies of the round (Flower's
  ``num_sampled_clients``, set each round before the noise): a site that drops out therefore
  does not weaken the noise of the others' average. The number of sites taking part is not
  hidden.
- ``z`` is calibrated with Opacus' RDP accountant (``shared.dp_accounting``, as the sites'
  record-level DP) so that the planned releases (``num-server-rounds`` x ``repeats``, every
  site in every round: sample rate 1, no amplification by sampling) spend at most
  ``dp-epsilon`` at ``dp-delta``.

Flower ships an accountant for this wrapper (``flwr.serverapp.RdpAccountant``), but it needs
Google's ``dp-accounting`` package, whose pinned dependencies conflict with this project's
(``pip install --dry-run dp-accounting`` shows which); Opacus, which the sites already use,
is used instead. For sample rate 1 both compute the RDP of the Gaussian mechanism,
``alpha * T / (2 z^2)``, exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.supercore.differential_privacy import compute_stdv

from server.guarded import GuardedAggregation, Release, RoundHook, reply_problem
from shared.dp_accounting import noise_multiplier
from shared.settings import RunSettings

log = logging.getLogger(__name__)


def planned_releases(settings: RunSettings) -> int:
    """Noised averages one run releases: every round of every repeat."""
    return settings.num_server_rounds * settings.repeats


class GuardedClientSideDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping around a guarded FedAvg / FedProx.

    Flower calls this wrapper's ``configure_train`` (it adds ``clipping_norm`` to the train
    config) and ``aggregate_train`` (the inner strategy drops unsound replies and averages,
    then the wrapper adds the noise). The fedadapt round hook is called here, after the noise,
    so the checkpoint, the report and the next round all see the released (noised) model; the
    inner strategy is built without one.

    Parameters
    ----------
    strategy : GuardedAggregation
        A guarded FedAvg or FedProx averaging by ``unit-weight`` (uniform).
    noise_multiplier, clipping_norm : float
        ``z`` and ``dp-clip``.
    num_sampled_clients : int
        Sites expected per round; each round it is set to the number of sound replies.
    on_round : callable, optional
        fedadapt's round hook (``server.guarded.RoundHook``).

    Attributes
    ----------
    outcome : TrainingOutcome
        The inner strategy's, with the noise multiplier and each round's release.
    """

    def __init__(self, strategy: GuardedAggregation, noise_multiplier: float,
                 clipping_norm: float, num_sampled_clients: int,
                 on_round: RoundHook | None = None) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.inner = strategy
        self.on_round = on_round
        self.outcome = strategy.outcome
        self.outcome.noise_multiplier = noise_multiplier

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the sound replies uniformly, add the noise, then tell the round hook."""
        inner = self.inner
        replies = list(replies)
        sound = sum(reply_problem(r, inner.shapes, inner.metric_keys) is None for r in replies)
        # The noise's scale follows the sites actually averaged: std z * C / m on their mean.
        self.num_sampled_clients = max(1, sound)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self.outcome.noise_multiplier = self.noise_multiplier
        if arrays is not None:
            std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
            self.outcome.released[server_round] = Release(sound, std)
        if self.on_round is not None:
            self.on_round(server_round, arrays, metrics, inner.rejected.get(server_round, []))
        return arrays, metrics


def wrap(settings: RunSettings, strategy: GuardedAggregation, n_sites: int,
         on_round: RoundHook | None) -> GuardedClientSideDP:
    """The training strategy under ``dp = "client"``: ``strategy`` in Flower's wrapper.

    Parameters
    ----------
    settings : RunSettings
        ``dp-epsilon``, ``dp-delta`` and ``dp-clip``, over the run's planned releases.
    strategy : GuardedAggregation
        A guarded FedAvg or FedProx averaging by ``unit-weight``.
    n_sites : int
        Sites expected per round.
    on_round : callable, optional
        fedadapt's round hook, called after the noise.

    Returns
    -------
    GuardedClientSideDP
        With the noise multiplier calibrated for the budget.
    """
    z = noise_multiplier(settings.dp_epsilon, settings.dp_delta, 1.0,
                         planned_releases(settings))
    log.info("client-level DP: noise multiplier %.4f, clipping norm %g, %d site(s): noise std "
             "%.4g on the average (epsilon %g at delta %g over %d rounds)", z, settings.dp_clip,
             n_sites, z * settings.dp_clip / max(1, n_sites), settings.dp_epsilon,
             settings.dp_delta, planned_releases(settings))
    return GuardedClientSideDP(strategy, z, settings.dp_clip, max(1, n_sites), on_round)
