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

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client import secagg
from client.contract import Stage
from shared import protocol, summed
from shared.schema import Feature

STATE_KEY = "secagg"  # the current secure sum's state
KEYS_KEY = "secagg-keys"  # the batch of key pairs, one per sum to come, each used once


def answer(stage: Stage, node: int, state: RecordDict) -> dict[str, Any]:
    """The keys, share or unmask stage's answer (the values of the reply's secagg record).

    Raises
    ------
    client.secagg.SecAggRefused
        If the stage would reveal the site's vector, or comes out of order.
    """
    if stage.name == "keys":
        pairs = [secagg.SiteState(node=node) for _ in range(stage.count)]
        public = [secagg.keys(pair) for pair in pairs]
        state[KEYS_KEY] = ConfigRecord({
            "batch": stage.sum_id, "used": [-1],  # -1: none yet (an index is never negative)
            **{k: [getattr(p, k) for p in pairs] for k in ("sk1", "pk1", "sk2", "pk2")}})
        return {"pk1": [a for a, _ in public], "pk2": [b for _, b in public]}
    if stage.name == "share":
        site = _pair(state, stage, node)
        boxes = secagg.share(site, stage.public, stage.threshold)
        _keep(state, site)
        return {"to": sorted(boxes), "boxes": [boxes[n] for n in sorted(boxes)]}
    site = _kept(state, stage.sum_id)
    if stage.name == "unmask":
        shares = secagg.unmask(site, stage.active, stage.dead)
        _keep(state, site)
        return {"nodes": sorted(shares), "shares": [shares[n] for n in sorted(shares)]}
    raise secagg.SecAggRefused("the masked stage needs the site's data")


def masked_vector(stage: Stage, node: int, state: RecordDict, plain: Message, newton: bool,
                  features: list[Feature], order: list[str]) -> ArrayRecord:
    """The masked vector of the site's plain reply (built, checked, and never sent plain).

    Parameters
    ----------
    stage : client.contract.Stage
        The masked stage's request.
    node : int
        This site's node id.
    state : RecordDict
        The site's ``context.state`` (the secure sum's keys and shares).
    plain : Message
        The site's reply to the inner stats or train message, as ``client.egress`` built it.
    newton : bool
        The inner message is a Newton round.
    features : list of Feature
        The schema's shared features (a stats vector's layout).
    order : list of str
        The names of the weights the coordinator sent, in its order (a FedAvg vector's).
    """
    site = _kept(state, stage.sum_id)
    content = plain.content
    metrics = content.metric_records[protocol.METRICS]
    if stage.inner == "stats":
        vector = summed.stats_vector(metrics, features)
    else:
        arrays = {k: v.numpy() for k, v in content.array_records[protocol.ARRAYS].items()}
        if newton:
            vector = summed.newton_vector(arrays, metrics)
        else:
            vector = summed.fedavg_vector(arrays, metrics, order)
    out = secagg.masked(site, stage.incoming, vector, stage.clip)
    _keep(state, site)
    return ArrayRecord({protocol.MASKED: Array(np.ascontiguousarray(out, dtype=np.uint64))})


def _pair(state: RecordDict, stage: Stage, node: int) -> secagg.SiteState:
    """A new sum's state with the batch's key pair ``stage.index``, which is then used up.

    Raises
    ------
    client.secagg.SecAggRefused
        For another batch, a pair that does not exist, or one used already (a pair's secret
        key, shared among neighbours once, must not mask a second vector).
    """
    batch = state.config_records.get(KEYS_KEY)
    if batch is None or batch.get("batch") != stage.batch:
        raise secagg.SecAggRefused("this sum names key pairs the site did not make")
    used = [int(i) for i in _list(batch, "used")]
    keys = {k: [bytes(v) for v in _list(batch, k)] for k in ("sk1", "pk1", "sk2", "pk2")}
    if not 0 <= stage.index < len(keys["sk1"]) or stage.index in used:
        raise secagg.SecAggRefused("this sum's key pair does not exist or was used already")
    batch["used"] = [*used, stage.index]
    i = stage.index
    return secagg.SiteState(node=node, sum_id=stage.sum_id, sk1=keys["sk1"][i],
                            pk1=keys["pk1"][i], sk2=keys["sk2"][i], pk2=keys["pk2"][i])


def _list(record: ConfigRecord, key: str) -> list[Any]:
    value = record[key]
    return list(value) if isinstance(value, list) else [value]


def _keep(state: RecordDict, site: secagg.SiteState) -> None:
    state[STATE_KEY] = ConfigRecord(secagg.to_record(site))


def _kept(state: RecordDict, sum_id: str) -> secagg.SiteState:
    record = state.config_records.get(STATE_KEY)
    if record is None or record.get("sum-id") != sum_id:
        raise secagg.SecAggRefused("this stage belongs to no secure sum the site has keys for")
    return secagg.from_record(record)
