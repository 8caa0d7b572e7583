"""Reaching the sites: a bounded wait, one-off queries, a grid limited to healthy sites."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from server.audit import ReplyLog
from server.secagg import SecAggAborted
from server.secure_rounds import SecureChannel, SecureOutcome, total_reply
from shared import protocol
from shared.errors import FedadaptError

log = logging.getLogger(__name__)


class NotEnoughSites(FedadaptError, RuntimeError):
    """Fewer sites than the configured minimum joined in time."""


class TrainingRefused(NotEnoughSites):
    """Too few sites accept training: the others refused it by their policies (no wait helps)."""


def wait_for_sites(
    grid: Grid, min_sites: int, timeout: float, expected: int = 0, poll: float = 0.2
) -> list[int]:
    """Wait for the sites: until ``expected`` have joined, or ``timeout`` seconds have passed.

    Flower's strategies wait for nodes without a bound; fedadapt never does. After the
    timeout the run goes on with the sites that joined, if they are at least ``min_sites``.

    Raises
    ------
    NotEnoughSites
        Naming how many joined and which setting to change.
    """
    target = max(min_sites, expected)
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) != last:
            log.info("%d of %d expected site(s) connected (min-sites %d)", len(nodes), target,
                     min_sites)
            last = len(nodes)
        if len(nodes) >= target:
            return nodes
        if time.monotonic() >= deadline:
            if len(nodes) >= min_sites:
                log.warning("going on with %d of %d expected sites after %.0f s", len(nodes),
                            target, timeout)
                return nodes
            raise NotEnoughSites(
                f"only {len(nodes)} site(s) connected after {timeout:.0f} s, fewer than "
                f"min-sites = {min_sites}: start more sites"
                + (", or lower min-sites" if min_sites > 1 else "")
                + ", or raise node-wait-timeout"
            )
        time.sleep(poll)


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float | None, poll: float = 0.1,
    max_poll: float = 0.5, audit: ReplyLog | None = None, label: dict[str, Any] | None = None,
    first_reply_timeout: float | None = None, window: int = 0,
) -> dict[int, Message]:
    """Push one message per node, then pull replies until all arrived or none came for ``timeout``.

    The timeout counts from the last reply received (from the push before the first): a site
    is given up on only when the others have stopped answering too, so a site that is merely
    queued (Flower's simulation engine runs a few virtual sites at a time) is never taken for
    a lost one, and a dead site still costs one timeout after the last live reply. Before the
    first reply the wait is ``first_reply_timeout`` (default: ``timeout``): when no site has
    answered yet, the machine or the network is slow, not one site, and giving up would drop
    every site at once.

    With ``window > 0`` at most that many messages are in flight: the next is pushed as a
    reply comes in. Flower's link state scans every stored message for every node it serves
    (``InMemoryLinkState.get_message_ins``), a pass whose cost grows with the messages stored;
    a window keeps that scan short. Sites given up on free their places in the window.

    Flower's deployed grid (``send_and_receive``) sleeps seconds between pulls; a round would
    pay for that wait every time. This loop uses Flower's own ``push_messages`` and
    ``pull_messages`` and polls every ``poll`` seconds, growing to ``max_poll``, instead.
    Replies to messages of an earlier call are never returned: only the ids pushed here are
    pulled.

    Returns
    -------
    dict
        Reply per node, error replies included; nodes that did not answer are absent. A reply
        is attributed to the node its message was SENT to (through the id it answers), never
        to the source it names: Flower's own error replies (a node that became unavailable)
        come from the SuperLink's node id, not from the site's.
    """
    waiting = list(messages)
    if not waiting:  # a strategy that converged sends nothing
        return {}
    nodes = [m.metadata.dst_node_id for m in waiting]
    if len(set(nodes)) != len(nodes):
        raise ValueError("send_and_receive sends one message per node")
    size = window if window > 0 else len(waiting)
    destination: dict[str, int] = {}
    ids: set[str] = set()

    def push() -> None:
        batch, waiting[:] = waiting[:size - len(ids)], waiting[size - len(ids):]
        if batch:
            ids.update(grid.push_messages(batch))
            destination.update({m.metadata.message_id: m.metadata.dst_node_id for m in batch})

    push()
    first = max(timeout or 0.0, first_reply_timeout or 0.0)
    deadline = time.monotonic() + first
    replies: dict[int, Message] = {}
    while ids:
        pulled = list(grid.pull_messages(ids))
        for reply in pulled:
            answered = reply.metadata.reply_to_message_id
            if answered in destination:
                replies[destination[answered]] = reply
            ids.discard(answered)
        if pulled and timeout is not None:
            # The timeout counts from the last reply: sites still answering are not lost.
            # Flower's simulation engine runs a few virtual sites at a time and queues the
            # rest; with many sites the last ones start long after the message was sent.
            deadline = time.monotonic() + timeout
            poll = 0.1
        push()
        if timeout is not None and time.monotonic() >= deadline:
            if not waiting:
                break
            ids.clear()  # give up on the silent ones in the window; the rest still get a turn
            push()
            deadline = time.monotonic() + first
        if not ids:
            break
        time.sleep(poll)
        poll = min(poll * 1.5, max_poll)
    if audit is not None:
        audit.record(replies, {**(label or {}), "sent": sorted(destination)})
    return replies


def query_sites(
    grid: Grid, nodes: Iterable[int], message_type: str, content: RecordDict, timeout: float,
    audit: ReplyLog | None = None, window: int = 0,
) -> dict[int, Message]:
    """Send one message to each node and collect the replies that arrive within ``timeout``.

    Returns
    -------
    dict
        Reply per node id (error replies included); nodes that did not answer are absent.
    """
    messages = [
        Message(content=content, message_type=message_type, dst_node_id=node) for node in nodes
    ]
    return send_and_receive(grid, messages, timeout=timeout, audit=audit, window=window)


class SiteGrid(Grid):
    """The grid as a strategy sees it: the healthy sites only, and never an endless wait.

    Flower's strategies sample from ``grid.get_node_ids()`` and wait, without bound, until
    enough nodes are listed. This grid lists only the sites that passed the stats phase and
    have not missed a round. A site that does not answer a training round in time (or answers
    with an error) sits out the rest of this training phase: a dead site then costs one reply
    timeout, not one per remaining round while Flower still lists it as connected. Its late
    reply is never pulled into a later round (only the current round's message ids are).
    When fewer than ``min_sites`` remain for longer than ``wait``, the run stops with
    :class:`NotEnoughSites` instead of waiting forever.

    Parameters
    ----------
    grid : Grid
        Flower's grid.
    nodes : iterable of int
        The healthy sites' node ids.
    audit : ReplyLog, optional
        Where replies are recorded.
    min_sites : int
        Fewest sites to go on with.
    wait : float
        Seconds to wait for enough sites before giving up.
    first_reply_timeout : float, optional
        Seconds a round waits while no site has answered at all (a busy machine or network).
    window : int
        Most messages in flight at once (0: all); see :func:`send_and_receive`.
    secure : SecureChannel, optional
        With secure aggregation, a training round is one secure sum: the strategy receives
        its total as one reply (``server.secure_rounds.total_reply``), never a site's.
    """

    def __init__(
        self, grid: Grid, nodes: Iterable[int], audit: ReplyLog | None = None,
        min_sites: int = 1, wait: float = 60.0, names: Mapping[int, str] | None = None,
        first_reply_timeout: float | None = None, window: int = 0,
        secure: SecureChannel | None = None,
    ) -> None:
        self._grid = grid
        self._names = dict(names or {})
        self._nodes = sorted(nodes)
        self._audit = audit
        self.min_sites = min_sites
        self.wait = wait
        self.first_reply_timeout = first_reply_timeout
        self.window = window
        self.dropped: dict[int, tuple[int, str]] = {}  # node -> (round, reason)
        self.refused: set[int] = set()  # dropped by their own policy's refusal: not coming back
        self.round = 0
        self._short_since: float | None = None
        self.secure = secure
        # Secure aggregation, per round: each site's DP spending (its masked reply says it),
        # who is in the total and who was lost after sharing keys, or why it aborted.
        self.dp_spent: dict[int, dict[str, tuple[float, float]]] = {}
        self.sums: dict[int, dict[str, Any]] = {}
        self.aborted: dict[int, str] = {}

    def _drop(self, node: int, rnd: int, reason: str) -> None:
        """A site sits out the rest of training from round ``rnd`` (said when it happens)."""
        if node in self.dropped:
            return
        self.dropped[node] = (rnd, reason)
        log.warning("site %s sits out training from round %d: %s",
                    self._names.get(node, f"node {node}"), rnd, reason)

    def set_run(self, run: Run) -> None:
        """Delegate to the wrapped grid."""
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self._grid.run

    def create_message(self, *args: object, **kwargs: object) -> Message:
        """Delegate to the wrapped grid (deprecated in Flower; kept for the interface)."""
        return self._grid.create_message(*args, **kwargs)  # type: ignore[arg-type]

    def get_node_ids(self) -> list[int]:
        """The healthy sites still connected; raises when too few remain for too long."""
        connected = set(self._grid.get_node_ids())
        for n in self._nodes:
            if n not in connected and n not in self.dropped:
                self._drop(n, self.round + 1, "disconnected")
        nodes = [n for n in self._nodes if n not in self.dropped]
        if len(nodes) >= self.min_sites:
            self._short_since = None
            return nodes
        if len(nodes) + len(set(self.dropped) - self.refused) < self.min_sites:
            names = sorted(self._names.get(n, f"node-{n}") for n in self.refused)
            raise TrainingRefused(
                f"only {len(nodes)} site(s) left for training, fewer than min-sites = "
                f"{self.min_sites}: {', '.join(names)} refused training by their policies")
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
            log.warning("only %d site(s) left for training, fewer than min-sites = %d; "
                        "waiting up to %.0f s", len(nodes), self.min_sites, self.wait)
        if now - self._short_since > self.wait:
            raise NotEnoughSites(
                f"only {len(nodes)} site(s) left for training after {self.wait:.0f} s, fewer "
                f"than min-sites = {self.min_sites} (dropped: {len(self.dropped)}): restart "
                "the missing sites" + (", or lower min-sites" if self.min_sites > 1 else "")
            )
        return nodes

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate to the wrapped grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate to the wrapped grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push and pull with short polling; drop the sites that did not answer soundly."""
        messages = list(messages)
        if messages and messages[0].metadata.message_type == protocol.TRAIN:
            config = messages[0].content.config_records.get(protocol.CONFIG)
            self.round = protocol.absolute_round(config) or 0
            if self.secure is not None:
                return self._secure_round(messages)
        replies = send_and_receive(self._grid, messages, timeout, audit=self._audit,
                                   label={"round": self.round},
                                   first_reply_timeout=self.first_reply_timeout,
                                   window=self.window)
        for m in messages:
            node = m.metadata.dst_node_id
            reply = replies.get(node)
            if reply is None:
                self._drop(node, self.round, f"no reply within {timeout} s")
            elif reply.has_error():
                if reply.error.code == protocol.REFUSED:
                    self.refused.add(node)
                self._drop(node, self.round, str(reply.error.reason))
        # The strategy sees the sites' own replies only; errors are accounted for above.
        return [r for r in replies.values() if not r.has_error()]

    def _secure_round(self, messages: list[Message]) -> list[Message]:
        """One training round as a secure sum: its total as one reply, or none if aborted."""
        assert self.secure is not None
        nodes = [m.metadata.dst_node_id for m in messages]
        content = messages[0].content  # the strategy sends every site the same records
        try:
            outcome = self.secure.run(nodes, "train", content, {"round": self.round})
        except SecAggAborted as err:
            self._account(self.secure.outcome)
            self.aborted[self.round] = str(err)
            log.warning("round %d: %s; the global model is unchanged", self.round, err)
            return []
        self._account(outcome)
        assert outcome.result is not None
        self.sums[self.round] = {
            "sites": len(outcome.result.survivors),
            "lost_after_keys": sorted(self._names.get(n, f"node-{n}")
                                      for n in outcome.result.lost),
            "error_bound": outcome.result.error_bound}
        for node in outcome.result.survivors:
            record = outcome.replies[node].content.metric_records.get(protocol.METRICS)
            eps, delta = ((record.get(k) for k in protocol.DP_METRICS) if record is not None
                          else (None, None))
            if isinstance(eps, float) and isinstance(delta, float):
                self.dp_spent.setdefault(self.round, {})[
                    self._names.get(node, f"node {node}")] = (eps, delta)
        return [total_reply(outcome.result, content)]

    def _account(self, outcome: SecureOutcome) -> None:
        """Drop the sites that left a secure sum (an error, a refusal, or silence)."""
        for node in sorted(outcome.silent):
            self._drop(node, self.round, "no reply within the reply timeout (secure sum)")
        for node, reply in outcome.replies.items():
            if reply.has_error():
                if reply.error.code == protocol.REFUSED:
                    self.refused.add(node)
                self._drop(node, self.round, str(reply.error.reason))
