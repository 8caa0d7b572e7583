"""Secure sums over Flower's grid: each stage as ``query.secagg`` messages, the total back.

:func:`server.secagg.secure_sum` runs the protocol through an ``ask`` callable; here that
callable sends one stage's messages with :func:`server.sites.send_and_receive` (reply
timeouts, the ``max-in-flight`` window and the reply log as for any round) and reads the
sites' answers. A site that answers a stage with an error, or not at all, is lost from that
stage on, with its reason kept. :func:`total_reply` turns a summed train round into the one
reply a Flower strategy aggregates.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid

from server.audit import ReplyLog
from server.secagg import SecureSum, secure_sum
from shared import protocol, summed
from shared.secagg import MAX_KEY_PAIRS

# The node a summed train round's one reply comes from: no site has it.
SECURE_SUM_NODE = 0
SECURE_SUM_NAME = "secure sum"


@dataclass
class SecureOutcome:
    """One secure sum over the grid.

    Attributes
    ----------
    result : SecureSum or None
        The total and who is in it; None until the sum completed.
    replies : dict
        Per site, its masked stage's reply (its name, a DP round's epsilon) or the error
        reply that ended its part.
    silent : set
        The sites that did not answer a stage they were asked in time.
    """

    result: SecureSum | None = None
    replies: dict[int, Message] = field(default_factory=dict)
    silent: set[int] = field(default_factory=set)


class SecureChannel:
    """Secure sums of one kind of message over Flower's grid.

    Parameters
    ----------
    grid : Grid
        Flower's grid.
    threshold, neighbours, clip
        The run's ``secagg-threshold``, ``secagg-neighbours`` and ``secagg-clip``.
    timeout, first_reply_timeout : float or None
        Seconds without a reply after which the silent sites of a stage are lost.
    window : int
        Most messages in flight (``max-in-flight``).
    audit : ReplyLog, optional
        The coordinator's reply log.
    sums : int
        Sums the sites make key pairs for at once (a repeat's stats phase and training
        rounds): each sum after the first of a batch skips the keys stage, one exchange
        with every site fewer. Every pair still serves one sum only.
    """

    def __init__(self, grid: Grid, *, threshold: float, neighbours: int, clip: float,
                 timeout: float | None, first_reply_timeout: float | None = None,
                 window: int = 0, audit: ReplyLog | None = None, sums: int = 1) -> None:
        self.grid, self.threshold, self.neighbours, self.clip = grid, threshold, neighbours, clip
        self.timeout, self.first_reply_timeout = timeout, first_reply_timeout
        self.window, self.audit = window, audit
        self.sums = max(1, min(sums, MAX_KEY_PAIRS))
        self.outcome = SecureOutcome()  # the last sum's, aborted or not
        # The batch of key pairs: its id, each site's public keys, the next pair to use.
        self.batch = ""
        self.public: dict[int, list[tuple[bytes, bytes]]] = {}
        self.next = 0
        # Over every sum: the largest error bound of a total, and its largest value.
        self.error_bound = 0.0
        self.largest = 0.0

    def run(self, nodes: list[int], inner: str, content: RecordDict,
            label: Mapping[str, Any] | None = None) -> SecureOutcome:
        """Sum the sites' replies to ``content`` (a stats or train message's records).

        Raises
        ------
        server.secagg.SecAggAborted
            With fewer sites than the threshold at a stage; ``self.outcome.replies`` then
            says why each site left.
        """
        from server.sites import send_and_receive  # sites imports this module

        outcome = self.outcome = SecureOutcome()
        sum_id = secrets.token_hex(8)

        def ask(stage: str, requests: Mapping[int, Any]) -> dict[int, Any]:
            messages = [Message(content=self._content(stage, sum_id, request, inner, content),
                                dst_node_id=node, message_type=protocol.SECAGG)
                        for node, request in requests.items()]
            replies = send_and_receive(
                self.grid, messages, self.timeout, audit=self.audit,
                label={**(label or {}), "secagg": stage},
                first_reply_timeout=self.first_reply_timeout, window=self.window)
            outcome.silent |= set(requests) - set(replies)
            answers: dict[int, Any] = {}
            for node, reply in replies.items():
                if reply.has_error():
                    outcome.replies[node] = reply
                    continue
                try:
                    answers[node] = _read(stage, reply)
                except (KeyError, TypeError, ValueError):
                    outcome.replies[node] = Message(
                        _malformed(stage), reply_to=_placeholder(node))
                    continue
                if stage == "masked":
                    outcome.replies[node] = reply
            return answers

        if self.next >= self.sums or any(n not in self.public for n in nodes):
            self.batch, self.next = sum_id, 0  # a new batch: the keys stage, for every sum
            keys = ask("keys", dict.fromkeys(nodes, self.sums))
            self.public = {n: pairs for n, pairs in keys.items() if len(pairs) == self.sums}
        index, self.next = self.next, self.next + 1
        public = {n: self.public[n][index] for n in nodes if n in self.public}
        outcome.result = result = secure_sum(
            lambda stage, requests: ask(stage, requests if stage != "share" else {
                n: (*r, index) for n, r in requests.items()}),
            list(public), self.threshold, self.clip, self.neighbours, public=public)
        self.error_bound = max(self.error_bound, result.error_bound)
        self.largest = max(self.largest, float(np.max(np.abs(result.total), initial=0.0)))
        return outcome

    def _content(self, stage: str, sum_id: str, request: Any, inner: str,
                 content: RecordDict) -> RecordDict:
        values: dict[str, Any] = {protocol.STAGE: stage, protocol.SUM_ID: sum_id}
        records: dict[str, Any] = {}
        if stage == "keys":
            values["count"] = request
        elif stage == "share":
            public, threshold, index = request
            nodes = sorted(public)
            values.update({"nodes": nodes, "pk1": [public[n][0] for n in nodes],
                           "pk2": [public[n][1] for n in nodes], "threshold": threshold,
                           "batch": self.batch, "index": index})
        elif stage == "masked":
            sources = sorted(request)
            values.update({"from": sources, "boxes": [request[n] for n in sources],
                           protocol.INNER: inner, protocol.CLIP: float(self.clip)})
            records = dict(content.items())
        elif stage == "unmask":
            active, dead = request
            values.update({"active": list(active), "dead": list(dead)})
        return RecordDict({**records, protocol.SECAGG_RECORD: ConfigRecord(values)})


def _read(stage: str, reply: Message) -> Any:
    """A stage's answer from a site's reply (``KeyError`` / ``TypeError`` if malformed)."""
    content = reply.content
    if stage == "masked":
        vector = content.array_records[protocol.ARRAYS][protocol.MASKED].numpy()
        if vector.dtype != np.uint64 or vector.ndim != 1:
            raise TypeError("not a masked vector")
        return vector
    record = content.config_records[protocol.SECAGG_RECORD]
    if stage == "keys":  # a batch: one pair of public keys per sum to come
        pk1, pk2 = record["pk1"], record["pk2"]
        if not isinstance(pk1, list) or not isinstance(pk2, list) or len(pk1) != len(pk2) or (
                not all(isinstance(k, bytes) for k in [*pk1, *pk2])):
            raise TypeError("not two lists of public keys")
        return list(zip(pk1, pk2, strict=True))
    names = ("to", "boxes") if stage == "share" else ("nodes", "shares")
    nodes, blobs = record[names[0]], record[names[1]]
    if not isinstance(nodes, list) or not isinstance(blobs, list) or len(nodes) != len(blobs):
        raise TypeError("mismatched lists")
    if not all(isinstance(n, int) for n in nodes) or not all(isinstance(b, bytes)
                                                              for b in blobs):
        raise TypeError("not node ids and byte strings")
    return dict(zip(nodes, blobs, strict=True))


def _malformed(stage: str) -> Error:
    return Error(code=protocol.SITE_ERROR, reason=f"a malformed reply to the {stage} stage")


def _placeholder(node: int) -> Message:
    """A message to ``node`` that a made-up reply can answer (it is never sent)."""
    return Message(content=RecordDict(), dst_node_id=node, message_type=protocol.SECAGG)


def train_kind(content: RecordDict) -> str:
    """``newton`` or ``fedavg``: how a train message's replies are summed."""
    config = content.config_records.get(protocol.CONFIG)
    return "newton" if config is not None and config.get(protocol.STRATEGY) == "newton" \
        else "fedavg"


def total_reply(result: SecureSum, content: RecordDict) -> Message:
    """The summed train round as one reply from :data:`SECURE_SUM_NODE`.

    A Newton reply's sums are the total; a FedAvg reply's weights are the examples-weighted
    mean, so Flower's FedAvg over this one reply gives what it would over the sites'.
    Counts are rounded to whole numbers (the quantisation error is far below one half).
    """
    sent = content.array_records[protocol.ARRAYS]
    newton = train_kind(content) == "newton"
    if newton:
        d = sum(math.prod(sent[k].shape) for k in sent)
        arrays, metrics = summed.newton_total(result.total, d)
    else:
        arrays, metrics = summed.fedavg_total(
            result.total, {k: tuple(sent[k].shape) for k in sent})
    if result.error_bound < 0.5:
        metrics[protocol.NUM_EXAMPLES] = float(round(metrics[protocol.NUM_EXAMPLES]))
    # Newton's sums in float64; FedAvg's mean in the dtype of the weights sent.
    record = ArrayRecord({k: Array(np.asarray(v, dtype=np.float64 if newton
                                              else sent[k].numpy().dtype))
                          for k, v in arrays.items()})
    reply_to = Message(content=RecordDict(), dst_node_id=SECURE_SUM_NODE,
                       message_type=protocol.TRAIN)
    return Message(content=RecordDict({protocol.ARRAYS: record,
                                       protocol.METRICS: MetricRecord(dict(metrics))}),
                   reply_to=reply_to)
