"""Collecting replies: queued sites are waited for, a silent one is given up after the timeout."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from server import sites


class _Clock:
    """Virtual time for the module under test: sleeping advances it, nothing really waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _QueuedGrid:
    """A grid whose sites answer one after another, ``spacing`` seconds apart (an engine queue)."""

    def __init__(self, clock: _Clock, spacing: float, silent: set[int]) -> None:
        self.clock, self.spacing, self.silent = clock, spacing, silent
        self.sent: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"
            self.sent.append(m)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        wanted = set(ids)
        ready = []
        for i, m in enumerate(self.sent):
            due = (i + 1) * self.spacing
            if (m.metadata.message_id in wanted and m.metadata.dst_node_id not in self.silent
                    and self.clock.now >= due):
                ready.append(Message(RecordDict({"config": ConfigRecord({})}), reply_to=m))
        return ready


def _messages(n: int) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=100 + i,
                    message_type="train") for i in range(n)]


def _as_grid(grid: object) -> Any:
    """The fakes implement the part of Flower's Grid that send_and_receive uses."""
    return grid


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    """Virtual time in ``server.sites``."""
    fake = _Clock()
    monkeypatch.setattr(sites, "time", fake)
    return fake


def test_sites_queued_behind_others_are_not_lost(clock: _Clock, task_identity: None) -> None:
    """50 sites answering 1 s apart with a 5 s timeout: all 50 replies are collected."""
    grid = _QueuedGrid(clock, spacing=1.0, silent=set())
    replies = sites.send_and_receive(_as_grid(grid), _messages(50), timeout=5.0)
    assert sorted(replies) == [100 + i for i in range(50)]
    assert clock.now >= 50.0  # far longer than the timeout: the queue was waited for


def test_a_silent_site_is_given_up_one_timeout_after_the_last_reply(
    clock: _Clock, task_identity: None
) -> None:
    """The others' replies are kept; the wait ends about one timeout after the last of them."""
    grid = _QueuedGrid(clock, spacing=1.0, silent={104})
    replies = sites.send_and_receive(_as_grid(grid), _messages(10), timeout=5.0)
    assert 104 not in replies and len(replies) == 9
    assert 10.0 + 5.0 <= clock.now <= 10.0 + 5.0 + 1.0


def test_nothing_to_send_returns_at_once(clock: _Clock) -> None:
    """A strategy that converged sends no message; nothing is waited for."""
    grid = _QueuedGrid(clock, spacing=1.0, silent=set())
    assert sites.send_and_receive(_as_grid(grid), [], timeout=5.0) == {}
    assert clock.now == 0.0


def test_no_reply_yet_waits_the_first_reply_timeout(clock: _Clock, task_identity: None) -> None:
    """Every site slow alike (a busy machine): no site is given up before the first reply."""
    grid = _QueuedGrid(clock, spacing=30.0, silent=set())
    replies = sites.send_and_receive(_as_grid(grid), _messages(1), timeout=5.0,
                                     first_reply_timeout=100.0)
    assert sorted(replies) == [100]  # answered after 30 s, six timeouts
    silent = _QueuedGrid(clock, spacing=1.0, silent={100, 101})
    start = clock.now
    assert sites.send_and_receive(_as_grid(silent), _messages(2), timeout=5.0,
                                  first_reply_timeout=100.0) == {}
    assert clock.now - start >= 100.0


class _CountingGrid(_QueuedGrid):
    """A queued grid that records how many messages were out (pushed, unanswered) at most."""

    def __init__(self, clock: _Clock, spacing: float, silent: set[int]) -> None:
        super().__init__(clock, spacing, silent)
        self.out: set[str] = set()
        self.most = 0
        self.pushed_at: dict[int, float] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for m in messages:
            mid = f"m{len(self.sent)}"
            m.metadata.__dict__["_message_id"] = mid
            self.sent.append(m)
            self.pushed_at[m.metadata.dst_node_id] = self.clock.now
            ids.append(mid)
        self.out.update(ids)
        self.most = max(self.most, len(self.out))
        return ids

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        wanted = set(ids)
        ready = []
        for m in self.sent:
            node = m.metadata.dst_node_id
            if (m.metadata.message_id in wanted and node not in self.silent
                    and self.clock.now >= self.pushed_at[node] + self.spacing):
                ready.append(Message(RecordDict({"config": ConfigRecord({})}), reply_to=m))
                self.out.discard(m.metadata.message_id)
        return ready


def test_a_window_bounds_the_messages_out_and_every_site_answers(
    clock: _Clock, task_identity: None
) -> None:
    """40 sites through a window of 8: never more than 8 out, all 40 replies collected."""
    grid = _CountingGrid(clock, spacing=1.0, silent=set())
    replies = sites.send_and_receive(_as_grid(grid), _messages(40), timeout=5.0, window=8)
    assert sorted(replies) == [100 + i for i in range(40)]
    assert grid.most == 8


def test_silent_sites_filling_the_window_do_not_starve_the_others(
    clock: _Clock, task_identity: None
) -> None:
    """The first 4 sites are dead and fill a window of 4: given up on, the others still run."""
    grid = _CountingGrid(clock, spacing=1.0, silent={100, 101, 102, 103})
    replies = sites.send_and_receive(_as_grid(grid), _messages(10), timeout=5.0, window=4)
    assert sorted(replies) == [104 + i for i in range(6)]


def test_too_few_sites_never_advises_a_min_sites_below_one() -> None:
    """min-sites = 1 and nobody came: start sites, or wait longer; not 'lower min-sites'."""
    from server.sites import NotEnoughSites, wait_for_sites

    class Empty:
        def get_node_ids(self) -> list[int]:
            return []

    with pytest.raises(NotEnoughSites) as one:
        wait_for_sites(Empty(), 1, timeout=0.0)  # type: ignore[arg-type]
    assert "lower min-sites" not in str(one.value)
    with pytest.raises(NotEnoughSites) as two:
        wait_for_sites(Empty(), 2, timeout=0.0)  # type: ignore[arg-type]
    assert "lower min-sites" in str(two.value)
