"""The in-process grid: sites answering when pushed or in threads of their own; a whole run."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from server.sites import send_and_receive
from shared import protocol
from simulations.generator import generate
from simulations.inprocess import Handler, InProcessGrid, run_app_in_process

NODES = (101, 102, 103)


def _site(delay: float) -> Handler:
    """A site that answers after ``delay`` seconds, with the round it was asked about."""

    def handle(msg: Message, context: Context) -> Message:
        time.sleep(delay)
        asked = msg.content.config_records["c"]
        return Message(RecordDict({"c": ConfigRecord(dict(asked))}), reply_to=msg)

    return handle


def _grid(slow: float) -> InProcessGrid:
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config={}) for n in NODES}
    handlers = {n: _site(slow if n == 102 else 0.0) for n in NODES}
    return InProcessGrid(contexts, ClientApp(), handlers, concurrent=True)


def _ask(grid: InProcessGrid, rnd: int, timeout: float) -> dict[int, int]:
    messages = [Message(RecordDict({"c": ConfigRecord({"round": rnd})}),
                        message_type=protocol.TRAIN, dst_node_id=n) for n in NODES]
    replies = send_and_receive(grid, messages, timeout=timeout)
    return {n: int(str(r.content.config_records["c"]["round"])) for n, r in replies.items()}


def test_a_site_slower_than_the_timeout_misses_that_exchange_and_its_reply_is_never_used(
    task_identity: None,
) -> None:
    """Sites answer in their own threads: the round closes on time without the slow one."""
    with _grid(slow=1.5) as grid:
        t0 = time.monotonic()
        assert _ask(grid, 1, timeout=0.3) == {101: 1, 103: 1}
        assert time.monotonic() - t0 < 1.4  # not held up by the slow site
        # Its reply to round 1 arrives during round 2, which waits for its answer to round 2.
        assert _ask(grid, 2, timeout=5.0) == {101: 2, 102: 2, 103: 2}


def test_the_sites_answer_in_parallel(task_identity: None) -> None:
    """Three sites taking 0.5 s each: one exchange takes about 0.5 s, not 1.5 s."""
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(),
                           run_config={}) for n in NODES}
    with InProcessGrid(contexts, ClientApp(), dict.fromkeys(NODES, _site(0.5)),
                       concurrent=True) as grid:
        t0 = time.monotonic()
        assert _ask(grid, 1, timeout=5.0) == {101: 1, 102: 1, 103: 1}
        assert time.monotonic() - t0 < 1.4


def test_a_whole_run_in_process_writes_the_report_and_the_log(tmp_path: Path) -> None:
    """The real ServerApp over virtual sites: report, events and log; the identity restored."""
    before = TaskIdentity._run_id
    manifest = generate(tmp_path / "data", n_sites=2, seed=3)
    report = run_app_in_process({"sites-manifest": str(manifest), "num-server-rounds": 2,
                                 "min-sites": 2}, 2, tmp_path / "out")
    assert [s["status"] for s in report["sites"].values()] == ["ok", "ok"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["config"]["run_id"] != before
    out = tmp_path / "out"
    assert (out / "report.md").is_file() and (out / "events.jsonl").is_file()
    assert "report written to" in (out / "logs" / "flwr-run.log").read_text(encoding="utf-8")
    assert sorted(p.name for p in (out / "sites").iterdir()) == ["hospital-a", "hospital-b"]
    assert TaskIdentity._run_id == before
