"""A Flower ``Grid`` that hands each message to a ClientApp in this process: no ray, no network.

The ServerApp's logic (phases, strategies, report) runs unchanged over it, in a fraction of a
second per round; tests and benchmarks use it where Flower's engine would only add start-up
time. Each node id stands for one site with its own ``Context`` (its ``node_config``).
:func:`run_app_in_process` runs the whole ServerApp over it, as ``simulations.superlink.run_app``
does in Flower's simulation engine (the drills' logic runs this way in the tests).
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.site import Manifest
from shared import logs

Handler = Callable[[Message, Context], Message]


class InProcessGrid(Grid):
    """Deliver messages to per-node handlers (a ClientApp by default): at once, or in threads.

    Parameters
    ----------
    contexts : dict
        ``Context`` per node id.
    client_app : ClientApp
        The site application every node runs.
    handlers : dict, optional
        Replacement handler per node id (a faulty or slow site in a drill).
    run_id : int
        The run's id.
    concurrent : bool
        Each site answers in a thread of its own, its messages one after another in the order
        they were pushed (as a SuperNode does), and a reply can be pulled once it is computed:
        a site that takes longer than the coordinator's reply timeout misses that round, as
        in Flower's engines. By default every message is answered at once, when pushed.
        Call :meth:`close` (or use the grid as a context manager) to wait for the threads.
    """

    def __init__(
        self,
        contexts: dict[int, Context],
        client_app: ClientApp,
        handlers: dict[int, Handler] | None = None,
        run_id: int = 1,
        concurrent: bool = False,
    ) -> None:
        self.contexts = contexts
        self.client_app = client_app
        self.handlers = dict(handlers or {})
        self.offline: set[int] = set()
        self.concurrent = concurrent
        self._run = Run.create_empty(run_id)
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        self._pending: dict[str, Future[Message | None]] = {}
        self._workers: dict[int, ThreadPoolExecutor] = {}
        adopt_task_identity(run_id)

    def set_run(self, run: Run) -> None:
        """Adopt ``run``."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run messages belong to."""
        return self._run

    def create_message(self, *args: object, **kwargs: object) -> Message:
        """Build a message (Flower's deprecated helper, kept for the interface)."""
        raise NotImplementedError("build Message objects directly")

    def get_node_ids(self) -> list[int]:
        """Nodes currently online."""
        return [n for n in self.contexts if n not in self.offline]

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if node in self.offline or node not in self.contexts:
            return None
        handler = self.handlers.get(node, self.client_app)
        return handler(message, self.contexts[node])

    def _worker(self, node: int) -> ThreadPoolExecutor:
        if node not in self._workers:
            self._workers[node] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"site-{node}")
        return self._workers[node]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver messages (now, or to each site's thread); their replies wait to be pulled."""
        ids = []
        for message in messages:
            mid = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = mid  # as Flower's own grids do
            if self.concurrent:
                node = message.metadata.dst_node_id
                self._pending[mid] = self._worker(node).submit(self._deliver, message)
            else:
                reply = self._deliver(message)
                if reply is not None:
                    self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies of the given messages that exist (a handler's exception is raised here)."""
        replies = []
        for mid in message_ids:
            future = self._pending.get(mid)
            if future is not None and future.done():
                del self._pending[mid]
                reply = future.result()
                if reply is not None:
                    self._replies[mid] = reply
            if mid in self._replies:
                replies.append(self._replies.pop(mid))
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver and collect the replies that arrive within ``timeout`` (offline nodes: none)."""
        ids = self.push_messages(messages)
        waiting = [self._pending[m] for m in ids if m in self._pending]
        wait(waiting, timeout=timeout)
        return self.pull_messages(ids)

    def close(self) -> None:
        """Wait for every site's thread to finish what it was given (a straggler's late reply)."""
        for worker in self._workers.values():
            worker.shutdown(wait=True)
        self._workers.clear()

    def __enter__(self) -> InProcessGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def manifest_contexts(manifest: Manifest, out: Path, run_config: dict[str, Any]) -> dict[
    int, Context
]:
    """One deployment-style ``Context`` per site of a manifest (node ids 101, 102, ...).

    The sites are simulated (``simulated = true`` in their node config): the researcher owns
    every one, so they follow the run's split settings, as a simulation's sites do.
    """
    contexts = {}
    for i, site in enumerate(manifest.sites):
        node = 101 + i
        node_config: dict[str, Any] = {
            "simulated": True,
            "data-file": str(site.data_file),
            "site-name": site.name,
            "site-features": ",".join(site.site_features),
            "site-dir": str(
                site.site_dir if site.site_dir != Path() else out / "sites" / site.name
            ),
        }
        if site.policy is not None:
            node_config["policy"] = str(site.policy)
        contexts[node] = Context(run_id=1, node_id=node, node_config=node_config,
                                 state=RecordDict(), run_config=run_config)
    return contexts


def simulation_contexts(num_sites: int, run_config: dict[str, Any], run_id: int = 1
                        ) -> dict[int, Context]:
    """One ``Context`` per virtual site, as Flower's simulation engine gives it (node ids 101...).

    Its ``node_config`` holds only ``partition-id`` and ``num-partitions``: the ClientApp finds
    its site in the run's ``sites-manifest`` (``client.site.resolve_site``).
    """
    return {101 + i: Context(run_id=run_id, node_id=101 + i,
                             node_config={"partition-id": i, "num-partitions": num_sites},
                             state=RecordDict(), run_config=run_config)
            for i in range(num_sites)}


def run_app_in_process(
    run_config: dict[str, Any], num_sites: int, out: Path, client_app: ClientApp | None = None,
) -> dict[str, Any]:
    """Run the fedadapt ServerApp over ``num_sites`` virtual sites in this process.

    What :func:`simulations.superlink.run_app` does in Flower's simulation engine, without
    Flower's processes: the real ServerApp (``server.server_app.app``) over an
    :class:`InProcessGrid` whose sites answer concurrently, each with the ClientApp and the
    ``Context`` the engine would give it. The same files land in ``out``: the report, plots,
    ``events.jsonl``, ``replies.jsonl``, the sites' folders, and in ``logs/flwr-run.log``
    the log lines of the ServerApp and the ClientApps (there is no ``superlink.log``).

    Parameters
    ----------
    run_config : dict
        Run-config overrides (keys of ``[tool.flwr.app.config]``); ``out`` is set here.
    num_sites : int
        Number of virtual sites (one per site of the manifest).
    out : Path
        Output folder.
    client_app : ClientApp, optional
        The ClientApp every site runs (default: fedadapt's, ``client.client_app.app``).

    Returns
    -------
    dict
        The content of ``report.json``.

    Raises
    ------
    Exception
        Whatever stopped the ServerApp (it raises where Flower's engine reports a failed run).
    """
    # Imported here, not with this module: importing the apps sets up logging (shared.logs).
    from client.client_app import app as site_app
    from server.server_app import app as server_app

    out = out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for stale in (out / "events.jsonl", out / "report.json"):  # as deploy.processes.start_run
        stale.unlink(missing_ok=True)
    run_config = {**run_config, "out": str(out)}
    run_id = secrets.randbits(63)  # a new run each time, as Flower's: a site's ledger counts runs
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    with task_identity(run_id), run_log(out / "logs" / "flwr-run.log"), InProcessGrid(
        simulation_contexts(num_sites, run_config, run_id), client_app or site_app,
        run_id=run_id, concurrent=True,
    ) as grid:
        server_app(grid, context)
    report: dict[str, Any] = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return report


def adopt_task_identity(run_id: int) -> None:
    """Give this process a ServerApp's identity (run ``run_id``) unless it already has one.

    Flower builds a message only in a process that has it; ``task_identity`` gives it for a
    block and restores the earlier one.
    """
    for name, value in (("task_id", 1), ("run_id", run_id), ("node_id", 1)):
        if getattr(TaskIdentity, f"_{name}") is None:
            setattr(TaskIdentity, name, value)


@contextmanager
def task_identity(run_id: int) -> Iterator[None]:
    """Act as the ServerApp of run ``run_id`` inside the block (its messages carry that id).

    Flower sets ``TaskIdentity`` once in the process it starts for a ServerApp; here one
    process may run several runs, so the earlier identity is restored afterwards.
    """
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, 1
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Append fedadapt's and Flower's log lines (INFO and above) to ``path`` inside the block.

    The loggers' levels are restored afterwards.
    """
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(logs.FORMAT))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(name) for name in (*logs.PACKAGES, "flwr")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
        handler.close()
