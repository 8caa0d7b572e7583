"""A site's answer to one stage of a secure sum: the stage read, its state kept at the site.

The coordinator drives a secure sum (``server.secagg``) with ``query.secagg`` messages, the
stage named in their ``secagg`` record. The keys, share and unmask stages hold no patient
data (keys, encrypted shares, survivors' lists); the masked stage carries an ordinary stats
or train message inside, which the site answers as it would answer it plainly (contract,
policy, DP, egress checks), then turns into one vector (``shared.summed``) and masks
(``client.secagg``). What the site keeps between stages stays in Flower's
``context.state``, at the site.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client import secagg
from client.contract import ContractError
from shared import protocol, summed
from shared.schema import Feature

STATE_KEY = "secagg"
MAX_NEIGHBOURS = 4096
MAX_BYTES = 4096  # a public key, or an encrypted pair of shares


@dataclass(frozen=True)
class Stage:
    """One stage's request, every value checked.

    Attributes
    ----------
    name : str
        ``keys``, ``share``, ``masked`` or ``unmask``.
    sum_id : str
        The secure sum it belongs to.
    public : dict
        ``share``: each neighbour's (and the site's own) two public keys.
    threshold : int
        ``share``: shares that rebuild a secret.
    incoming : dict
        ``masked``: the neighbours' encrypted shares for this site.
    inner : str
        ``masked``: the summed message's type (``stats`` or ``train``).
    clip : float
        ``masked``: the quantisation range.
    active, dead : list of int
        ``unmask``: the sites the coordinator says survived, and were lost.
    """

    name: str
    sum_id: str
    public: dict[int, tuple[bytes, bytes]]
    threshold: int
    incoming: dict[int, bytes]
    inner: str
    clip: float
    active: list[int]
    dead: list[int]


def parse_stage(msg: Message) -> Stage:
    """Read a secure sum's stage from ``msg``.

    Raises
    ------
    client.contract.ContractError
        For a missing or malformed value.
    """
    record = msg.content.config_records.get(protocol.SECAGG_RECORD)
    if record is None:
        raise ContractError("a secure-aggregation message without its 'secagg' record")
    name = record.get(protocol.STAGE)
    sum_id = record.get(protocol.SUM_ID)
    if name not in protocol.SECAGG_STAGES or not isinstance(sum_id, str) or not sum_id:
        raise ContractError("a secure-aggregation message names no known stage or sum")
    public: dict[int, tuple[bytes, bytes]] = {}
    incoming: dict[int, bytes] = {}
    threshold, inner, clip = 0, "", 0.0
    active: list[int] = []
    dead: list[int] = []
    if name == "share":
        nodes = _ints(record, "nodes")
        pk1, pk2 = _blobs(record, "pk1", len(nodes)), _blobs(record, "pk2", len(nodes))
        public = {n: (a, b) for n, a, b in zip(nodes, pk1, pk2, strict=True)}
        asked = record.get("threshold")
        if not isinstance(asked, int) or isinstance(asked, bool):
            raise ContractError("the share stage's threshold is not an integer")
        threshold = asked
    elif name == "masked":
        sources = _ints(record, "from")
        incoming = dict(zip(sources, _blobs(record, "boxes", len(sources)), strict=True))
        inner = str(record.get(protocol.INNER, ""))
        asked_clip = record.get(protocol.CLIP)
        if inner not in ("stats", "train"):
            raise ContractError("the masked stage sums a stats or a train message only")
        if not isinstance(asked_clip, float) or not 0.0 < asked_clip <= 1e15:
            raise ContractError("the masked stage's clip is not a number in (0, 1e15]")
        clip = asked_clip
    elif name == "unmask":
        active, dead = _ints(record, "active"), _ints(record, "dead")
    return Stage(name, sum_id, public, threshold, incoming, inner, clip, active, dead)


def inner_message(msg: Message, stage: Stage) -> Message:
    """The stats or train message a masked stage carries, as the site's handlers read it."""
    meta = copy.copy(msg.metadata)
    meta.message_type = protocol.STATS if stage.inner == "stats" else protocol.TRAIN
    content = RecordDict({k: v for k, v in msg.content.items()
                          if k != protocol.SECAGG_RECORD})
    # Flower builds a message from given metadata for its own use; here it keeps the run id.
    return Message(content=content, metadata=meta)  # type: ignore[call-overload]


def answer(stage: Stage, node: int, state: RecordDict) -> dict[str, Any]:
    """The keys, share or unmask stage's answer (the values of the reply's secagg record).

    Raises
    ------
    client.secagg.SecAggRefused
        If the stage would reveal the site's vector, or comes out of order.
    """
    if stage.name == "keys":
        site = secagg.SiteState(node=node, sum_id=stage.sum_id)
        pk1, pk2 = secagg.keys(site)
        _keep(state, site)
        return {"pk1": pk1, "pk2": pk2}
    site = _kept(state, stage.sum_id)
    if stage.name == "share":
        boxes = secagg.share(site, stage.public, stage.threshold)
        _keep(state, site)
        return {"to": sorted(boxes), "boxes": [boxes[n] for n in sorted(boxes)]}
    if stage.name == "unmask":
        shares = secagg.unmask(site, stage.active, stage.dead)
        _keep(state, site)
        return {"nodes": sorted(shares), "shares": [shares[n] for n in sorted(shares)]}
    raise secagg.SecAggRefused("the masked stage needs the site's data")


def masked_vector(stage: Stage, node: int, state: RecordDict, plain: Message, inner: Message,
                  features: list[Feature]) -> ArrayRecord:
    """The masked vector of the site's plain reply to the inner message (never sent plain)."""
    site = _kept(state, stage.sum_id)
    content = plain.content
    metrics = content.metric_records[protocol.METRICS]
    if stage.inner == "stats":
        vector = summed.stats_vector(dict(metrics), features)  # type: ignore[arg-type]
    else:
        arrays = {k: v.numpy() for k, v in content.array_records[protocol.ARRAYS].items()}
        config = inner.content.config_records.get(protocol.CONFIG)
        if config is not None and config.get(protocol.STRATEGY) == "newton":
            vector = summed.newton_vector(arrays, dict(metrics))  # type: ignore[arg-type]
        else:
            order = list(inner.content.array_records[protocol.ARRAYS])
            vector = summed.fedavg_vector(arrays, dict(metrics), order)  # type: ignore[arg-type]
    out = secagg.masked(site, stage.incoming, vector, stage.clip)
    _keep(state, site)
    return ArrayRecord({protocol.MASKED: Array(np.ascontiguousarray(out, dtype=np.uint64))})


def _keep(state: RecordDict, site: secagg.SiteState) -> None:
    state[STATE_KEY] = ConfigRecord(secagg.to_record(site))


def _kept(state: RecordDict, sum_id: str) -> secagg.SiteState:
    record = state.config_records.get(STATE_KEY)
    if record is None or record.get("sum-id") != sum_id:
        raise secagg.SecAggRefused("this stage belongs to no secure sum the site has keys for")
    return secagg.from_record(record)


def _ints(record: Mapping[str, Any], key: str) -> list[int]:
    values = record.get(key, [])
    if not isinstance(values, list) or len(values) > MAX_NEIGHBOURS or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ContractError(f"the secure sum's {key!r} is not a list of node ids")
    if len(set(values)) != len(values):
        raise ContractError(f"the secure sum's {key!r} names a node twice")
    return list(values)


def _blobs(record: Mapping[str, Any], key: str, length: int) -> list[bytes]:
    values = record.get(key, [])
    if not isinstance(values, list) or len(values) != length or not all(
            isinstance(v, bytes) and len(v) <= MAX_BYTES for v in values):
        raise ContractError(f"the secure sum's {key!r} is not {length} short byte strings")
    return list(values)
