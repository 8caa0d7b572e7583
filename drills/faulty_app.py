"""A misbehaving site for reliability drills: the real ClientApp with one injected fault.

A site's fault is the ``drill-fault`` entry of its row in the sites manifest (sites without
one behave normally). Only drills run this app (see ``simulations.superlink.app_variant``); the
real ClientApp has no fault switch.

Faults of a training reply: ``nan``, ``inf``, ``wrong-names``, ``wrong-shape``,
``negative-count``, ``absurd-count``, ``scaled:FACTOR`` (well-formed but wildly wrong).
A straggler: ``slow:ROUND:SECONDS`` (sleeps before answering that round).
Tampering with the stored correction before the evaluate phase: ``flip-byte``, ``truncate``,
``foreign`` (another site's file), ``wrong-key``, ``other-model``.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import client_app as real
from client.correction_store import correction_path, key_path, save_correction
from client.site import resolve_site
from shared import protocol
from shared.files import create_private_file

log = logging.getLogger(__name__)
app = ClientApp()

TAMPERS = ("flip-byte", "truncate", "foreign", "wrong-key", "other-model")


def _manifest(context: Context) -> dict[str, Any]:
    path = Path(str(context.run_config["sites-manifest"]))
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _fault(context: Context) -> str:
    if "partition-id" not in context.node_config:
        return ""
    entry = _manifest(context)["sites"][int(context.node_config["partition-id"])]
    return str(entry.get("drill-fault", ""))


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """The real stats phase."""
    return real.stats(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The real training round, then the site's fault applied to the reply."""
    fault = _fault(context)
    config = msg.content.config_records[protocol.CONFIG]
    number = int(str(config["server-round"])) + int(str(config.get("round-offset", 0)))
    if fault.startswith("slow:"):
        _, rnd, seconds = fault.split(":")
        if number == int(rnd):
            log.warning("drill: straggling %s s in round %d", seconds, number)
            time.sleep(float(seconds))
    reply = real.train(msg, context)
    if reply.has_error() or not fault or fault.startswith("slow:") or fault in TAMPERS:
        return reply
    arrays = reply.content.array_records[protocol.ARRAYS]
    metrics = dict(reply.content.metric_records[protocol.METRICS])
    values = {k: arrays[k].numpy().copy() for k in arrays}
    name = next(iter(values))
    if fault == "nan":
        values[name].flat[0] = np.nan
    elif fault == "inf":
        values[name].flat[0] = np.inf
    elif fault == "wrong-names":
        values = {f"layer{i}": v for i, v in enumerate(values.values())}
    elif fault == "wrong-shape":
        values[name] = np.zeros((values[name].size + 3,))
    elif fault == "negative-count":
        metrics[protocol.NUM_EXAMPLES] = -50.0
    elif fault == "absurd-count":
        metrics[protocol.NUM_EXAMPLES] = 1e12
    elif fault.startswith("scaled:"):
        factor = float(fault.split(":")[1])
        values = {k: v * factor for k, v in values.items()}
    else:
        raise ValueError(f"unknown drill fault {fault!r}")
    log.warning("drill: this site sends a %s reply", fault)
    content = RecordDict({
        protocol.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()}),
        protocol.METRICS: MetricRecord(metrics),
    })
    return Message(content=content, reply_to=msg)


@app.query("adapt")
def adapt(msg: Message, context: Context) -> Message:
    """The real adapt phase."""
    return real.adapt(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Tamper with the stored correction as the site's fault says, then the real evaluation."""
    fault = _fault(context)
    if fault in TAMPERS:
        _tamper(context, fault)
    return real.evaluate(msg, context)


def _tamper(context: Context, fault: str) -> None:
    site = resolve_site(context.node_config, context.run_config)
    folder = site.site_dir / "corrections"
    files = sorted(folder.glob("*.enc"), key=lambda p: p.stat().st_mtime)
    if not files:
        return
    path = files[-1]
    data = path.read_bytes()
    if fault == "flip-byte":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
    elif fault == "truncate":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif fault == "foreign":
        manifest = _manifest(context)
        me = int(context.node_config["partition-id"])
        other = manifest["sites"][(me + 1) % len(manifest["sites"])]["name"]
        # The other site's newest correction (its file name is its own model's digest).
        donors = (site.site_dir.parent / str(other) / "corrections").glob("*.enc")
        donor = max(donors, key=lambda p: p.stat().st_mtime)
        path.write_bytes(donor.read_bytes())
    elif fault == "wrong-key":
        key = key_path(site.site_dir)
        key.unlink()
        create_private_file(key, os.urandom(32))
    elif fault == "other-model":
        # A correction fitted on another source model, put where this model's would be.
        other_digest = "0" * 64
        save_correction(site.site_dir, site.name, other_digest,
                        {"applied": True, "strength": 1.0, "site_features": [],
                         "site_preprocessing": None, "intercept": 5.0, "coef": [],
                         "feature_names": [], "cv": {}, "reason": ""})
        correction_path(site.site_dir, other_digest).replace(path)
    log.warning("drill: the stored correction was subjected to %s", fault)
