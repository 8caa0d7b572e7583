"""Reaching the sites: a bounded wait, one-off queries, a grid limited to healthy sites."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from server.audit import ReplyLog

log = logging.getLogger(__name__)


class NotEnoughSites(RuntimeError):
    """Fewer sites than the configured minimum joined in time."""


def wait_for_sites(grid: Grid, min_sites: int, timeout: float, poll: float = 0.2) -> list[int]:
    """Wait until at least ``min_sites`` sites are connected, for at most ``timeout`` seconds.

    Flower's strategies wait for nodes without a bound; fedadapt never does.

    Raises
    ------
    NotEnoughSites
        Naming how many joined and which setting to change.
    """
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) != last:
            log.info("%d of at least %d site(s) connected", len(nodes), min_sites)
            last = len(nodes)
        if len(nodes) >= min_sites:
            return nodes
        if time.monotonic() >= deadline:
            raise NotEnoughSites(
                f"only {len(nodes)} site(s) connected after {timeout:.0f} s, fewer than "
                f"min-sites = {min_sites}: start more sites, or lower min-sites, or raise "
                "node-wait-timeout"
            )
        time.sleep(poll)


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float | None, poll: float = 0.1,
    max_poll: float = 0.5, audit: ReplyLog | None = None,
) -> list[Message]:
    """Push messages, then pull their replies until all arrived or ``timeout`` passed.

    Flower's deployed grid waits 3 s between pulls; a round would pay for that wait every
    time. This loop uses Flower's own ``push_messages``/``pull_messages`` and polls from
    0.1 s up to 0.5 s instead. Replies to messages of an earlier call are never returned:
    only the ids pushed here are pulled.
    """
    ids = set(grid.push_messages(messages))
    deadline = time.monotonic() + (timeout if timeout is not None else 0.0)
    replies: list[Message] = []
    while ids:
        got = list(grid.pull_messages(ids))
        replies += got
        ids -= {m.metadata.reply_to_message_id for m in got}
        if not ids or (timeout is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll)
        poll = min(poll * 1.5, max_poll)
    if audit is not None:
        audit.record(replies)
    return replies


def query_sites(
    grid: Grid, nodes: Iterable[int], message_type: str, content: RecordDict, timeout: float,
    audit: ReplyLog | None = None,
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
    replies = send_and_receive(grid, messages, timeout=timeout, audit=audit)
    return {reply.metadata.src_node_id: reply for reply in replies}


class SiteGrid(Grid):
    """The grid as a strategy sees it: only the sites that passed the stats phase.

    Flower's strategies sample from ``grid.get_node_ids()``; narrowing that list keeps a site
    whose data failed validation out of training without changing the strategy.
    """

    def __init__(self, grid: Grid, nodes: Iterable[int], audit: ReplyLog | None = None) -> None:
        self._grid = grid
        self._nodes = sorted(nodes)
        self._audit = audit

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
        """The healthy sites that are still connected."""
        connected = set(self._grid.get_node_ids())
        return [n for n in self._nodes if n in connected]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delegate to the wrapped grid."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Delegate to the wrapped grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push and pull with short polling (see :func:`send_and_receive`)."""
        return send_and_receive(self._grid, messages, timeout, audit=self._audit)
