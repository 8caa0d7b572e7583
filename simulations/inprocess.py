"""A Flower ``Grid`` that hands each message to a ClientApp in this process: no ray, no network.

The ServerApp's logic (phases, strategies, report) runs unchanged over it, in a fraction of a
second per round; tests and benchmarks use it where Flower's engine would only add start-up
time. Each node id stands for one site with its own ``Context`` (its ``node_config``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from client.site import Manifest

Handler = Callable[[Message, Context], Message]


class InProcessGrid(Grid):
    """Deliver messages synchronously to per-node handlers (a ClientApp by default).

    Parameters
    ----------
    contexts : dict
        ``Context`` per node id.
    client_app : ClientApp
        The site application every node runs.
    handlers : dict, optional
        Replacement handler per node id (a faulty or slow site in a drill).
    """

    def __init__(
        self,
        contexts: dict[int, Context],
        client_app: ClientApp,
        handlers: dict[int, Handler] | None = None,
        run_id: int = 1,
    ) -> None:
        self.contexts = contexts
        self.client_app = client_app
        self.handlers = dict(handlers or {})
        self.offline: set[int] = set()
        self._run = Run.create_empty(run_id)
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}
        for name, value in (("task_id", 1), ("run_id", run_id), ("node_id", 1)):
            if getattr(TaskIdentity, f"_{name}") is None:
                setattr(TaskIdentity, name, value)

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

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver messages now; their replies wait to be pulled."""
        ids = []
        for message in messages:
            mid = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = mid  # as Flower's own grids do
            reply = self._deliver(message)
            if reply is not None:
                self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies of the given messages that exist."""
        return [self._replies.pop(m) for m in message_ids if m in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Deliver and collect replies (an offline node gives none)."""
        return self.pull_messages(self.push_messages(messages))


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
