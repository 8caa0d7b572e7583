"""Newton's method for the logistic source model, as a Flower strategy: damped steps from sums.

Each round the sites send, at the weights they were sent, their loss, gradient and Hessian
sums (``shared.newton``). The coordinator adds them and compares the total loss with that of
the last accepted weights, over the sites that answered both rounds (a lost site changes
neither side of the comparison):

- lower (or the first round): the weights are accepted; the Newton step from them is solved
  and the full step is sent next;
- higher: the weights are rejected and half the previous step is sent from the accepted
  weights instead (backtracking, one halving per round).

So the accepted loss never rises, and the model the run ends with is the last accepted one,
never an untried step. When the accepted step's largest change of a weight is below
``newton-tolerance`` the run has converged: no more messages are sent, and the remaining
rounds are skipped (said in the log and the report).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from shared import newton, protocol

log = logging.getLogger(__name__)

# Backtracking halves the step at most this many times before the run stops at the accepted
# weights (a step of 2**-20 of Newton's is below any useful change).
MAX_HALVINGS = 20


class NewtonSteps(FedAvg):
    """FedAvg's sampling and messaging, with Newton steps in place of weight averaging.

    Parameters
    ----------
    weight_decay : float
        The L2 penalty of the objective (the coordinator adds it to the sites' sums).
    tolerance : float
        Converged when the accepted step changes no weight by more than this.
    noisy : bool
        The sums carry differential-privacy noise: the Hessian may not be positive definite,
        so its eigenvalues are floored (``shared.newton.newton_direction``).
    """

    def __init__(self, *args: object, weight_decay: float, tolerance: float,
                 noisy: bool = False, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.weight_decay = weight_decay
        self.tolerance = tolerance
        self.noisy = noisy
        self.sent: np.ndarray | None = None  # the weights the current round was asked at
        self.accepted: np.ndarray | None = None
        self.accepted_losses: dict[int, tuple[float, int]] = {}  # node -> (loss sum, rows)
        self.initial_losses: dict[int, tuple[float, int]] = {}  # the same at the start
        self.direction: np.ndarray | None = None  # Newton's step from the accepted weights
        self.scale = 1.0
        self.converged_round: int | None = None
        self.steps: list[dict[str, float | int | bool]] = []

    @property
    def finished(self) -> bool:
        """True once converged (or unable to decrease the loss): no more rounds are sent."""
        return self.converged_round is not None

    @property
    def best(self) -> ArrayRecord | None:
        """The last accepted weights: the model the run ends with."""
        return newton.to_arrays(self.accepted) if self.accepted is not None else None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's train messages at ``arrays``; none once converged."""
        if self.finished:
            return []
        self.sent = newton.parameters(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Add the sites' sums, accept or reject the weights they were taken at, step."""
        replies = list(replies)
        if self.finished or not replies or self.sent is None:
            return None, None
        sums: dict[int, newton.Sums] = {}
        for reply in replies:
            arrays = reply.content.array_records[protocol.ARRAYS]
            metrics = reply.content.metric_records[protocol.METRICS]
            loss, n = metrics["loss-sum"], metrics[protocol.NUM_EXAMPLES]
            assert isinstance(loss, int | float) and isinstance(n, int | float)  # checked
            sums[reply.metadata.src_node_id] = newton.sums_from_reply(
                {k: arrays[k].numpy() for k in arrays}, float(loss), int(n))
        total = _add(sums.values())
        loss_now = newton.objective(total, self.sent, self.weight_decay)
        accept = True
        if self.accepted is not None:
            common = [n for n in sums if n in self.accepted_losses]
            if common:
                new = _mean_loss({n: (sums[n].loss, sums[n].n) for n in common})
                old = _mean_loss({n: self.accepted_losses[n] for n in common})
                pen = 0.5 * self.weight_decay * float(np.sum(newton.penalty_mask(len(
                    self.sent)) * (self.sent ** 2 - self.accepted ** 2)))
                accept = new + pen <= old + 1e-12 * max(1.0, abs(old))
        if accept:
            if self.accepted is None:
                self.initial_losses = {n: (s.loss, s.n) for n, s in sums.items()}
            self.accepted = self.sent
            self.accepted_losses = {n: (s.loss, s.n) for n, s in sums.items()}
            self.direction = newton.newton_direction(total, self.sent, self.weight_decay,
                                                     noisy=self.noisy)
            self.scale = 1.0
        else:
            self.scale /= 2.0
        assert self.accepted is not None and self.direction is not None
        step = self.scale * self.direction
        size = float(np.max(np.abs(step))) if len(step) else 0.0
        record = {"round": server_round, "accepted": accept, "loss": loss_now,
                  "step": size, "sites": len(sums)}
        self.steps.append(record)
        if size < self.tolerance or self.scale < 2.0 ** -MAX_HALVINGS:
            self.converged_round = server_round
            log.info("round %d: Newton converged (largest step %.2e, tolerance %.0e); the "
                     "remaining rounds are skipped", server_round, size, self.tolerance)
            nxt = self.accepted
        else:
            nxt = self.accepted + step
            if not accept:
                log.info("round %d: the step raised the loss; trying half of it",
                         server_round)
        metrics = MetricRecord({"train-loss": loss_now, "global-loss": loss_now,
                                "newton-step": size, "step-accepted": float(accept)})
        return newton.to_arrays(nxt), metrics


def _add(items: Iterable[newton.Sums]) -> newton.Sums:
    items = list(items)
    total = items[0]
    for s in items[1:]:
        total = total + s
    return total


def _mean_loss(losses: dict[int, tuple[float, int]]) -> float:
    return sum(loss for loss, _ in losses.values()) / sum(n for _, n in losses.values())
