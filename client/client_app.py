"""The site's Flower ClientApp: one handler per phase, every reply built by ``client.egress``."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from threadpoolctl import threadpool_limits

from client.audit_log import audited
from client.contract import ModelRequest, Request, TrainRequest, parse, parse_stage
from client.egress import build_reply, error_reply
from client.jobs import (
    SiteRows,
    adapt_job,
    evaluate_job,
    newton_job,
    open_site,
    stats_job,
    summarized_site_features,
    train_job,
)
from client.policy import admit, check_reply_rows, site_policy
from client.secure_reply import answer, masked_vector
from client.site import resolve_site
from shared import logs, protocol

_STARTED = time.perf_counter()
log = logging.getLogger(__name__)
logs.configure()

app = ClientApp()

Work = Callable[[Message, SiteRows, Any], tuple[Message, bool]]


@functools.cache
def _one_thread(modules: int) -> None:
    """One BLAS/OpenMP thread for the libraries loaded, set again only when modules were added.

    These models are tiny, and several sites (or other programs) sharing a machine otherwise
    oversubscribe its cores (a correction fit is several times slower with two sites on two
    cores). Setting the limit walks every loaded library: it is not repeated for every
    message.
    """
    threadpool_limits(limits=1)


def _respond(msg: Message, context: Context, phase: str, work: Work) -> Message:
    """Run one phase's work at this site; any failure becomes a safe error reply."""
    t0 = time.perf_counter()
    site = None
    repeated = False
    try:
        site = resolve_site(context.node_config, context.run_config)
        policy = site_policy(site, context.state)
        request = parse(phase, msg, site, policy.input_bound)  # every value checked, once
        admit(policy, phase, request, site)  # before any data is read
        rows = open_site(site, request, policy, context.state)
        policy.check_rows("the training rows", len(rows.split.train))
        if phase == "evaluate":
            policy.check_rows("the held-out rows", len(rows.split.test))
        _one_thread(len(sys.modules))  # again only when modules were imported since
        reply, repeated = work(msg, rows, request)
        check_reply_rows(policy, reply)  # e.g. a feature's sum over too few observed values
    except Exception as err:  # every failure must still produce a reply without cell values
        reply = error_reply(msg, err, phase, site)
    else:
        log.info("%s done in %.2f s (process up %.2f s)", phase, time.perf_counter() - t0,
                 time.perf_counter() - _STARTED)
    # The one way out: every reply (result, error, refusal) is in the site's audit log first.
    return audited(msg, reply, phase, site, repeat=repeated)


def _secure(msg: Message, context: Context) -> Message:
    """One stage of a secure sum; the masked stage answers its inner message, then masks it.

    The masked stage carries a stats or train message's records: the site parses, admits
    and answers them as it would plainly (the reply built and checked by ``client.egress``
    under that type's rules), then sends only the masked vector of that reply.
    """
    t0 = time.perf_counter()
    site = None
    try:
        site = resolve_site(context.node_config, context.run_config)
        policy = site_policy(site, context.state)
        stage = parse_stage(msg)
        node = int(msg.metadata.dst_node_id)
        if stage.name != "masked":
            values = answer(stage, node, context.state)
            reply = build_reply(msg, shared_features=(), metrics={}, secagg=values)
        else:
            request = parse(stage.inner, msg, site, policy.input_bound)
            admit(policy, stage.inner, request, site, masked=True)
            rows = open_site(site, request, policy, context.state)
            policy.check_rows("the training rows", len(rows.split.train))
            _one_thread(len(sys.modules))
            answering = protocol.STATS if stage.inner == "stats" else protocol.TRAIN
            plain, _ = (_stats(msg, rows, request, answering) if stage.inner == "stats"
                        else _train(msg, rows, request, answering))  # type: ignore[arg-type]
            check_reply_rows(policy, plain)  # the plain reply is checked, then masked
            features = list(rows.schema.shared_features)
            sent = msg.content.array_records.get(protocol.ARRAYS)
            masked = masked_vector(stage, node, context.state, plain,
                                   isinstance(request, TrainRequest) and request.newton,
                                   features, list(sent) if sent is not None else [])
            dp = plain.content.metric_records[protocol.METRICS]
            site_record = ({protocol.SITE_NAME: rows.site.name,
                            protocol.SCHEMA_DIGEST: rows.schema.digest()}
                           if stage.inner == "stats" else None)
            reply = build_reply(
                msg, shared_features=features, arrays=masked, site=site_record, secagg={},
                metrics={k: float(dp[k]) for k in protocol.DP_METRICS  # type: ignore[arg-type]
                         if k in dp})
    except Exception as err:  # every failure must still produce a reply without cell values
        reply = error_reply(msg, err, "secagg", site)
    else:
        log.info("secagg done in %.2f s", time.perf_counter() - t0)
    return audited(msg, reply, "secagg", site)


def _stats(msg: Message, rows: SiteRows, request: Request, answering: str | None = None
           ) -> tuple[Message, bool]:
    metrics, repeated = stats_job(rows)
    own = summarized_site_features(rows)
    return build_reply(
        msg, shared_features=rows.schema.shared_features, metrics=metrics,
        site={protocol.SITE_NAME: rows.site.name, protocol.SCHEMA_DIGEST: rows.schema.digest(),
              protocol.SITE_FEATURES: ",".join(f.name for f in own)},
        site_features=own, answering=answering,
    ), repeated


def _train(msg: Message, rows: SiteRows, request: TrainRequest, answering: str | None = None
           ) -> tuple[Message, bool]:
    job = newton_job if request.newton else train_job
    arrays, metrics = job(rows, request)
    return build_reply(msg, shared_features=rows.schema.shared_features, metrics=metrics,
                       arrays=arrays, answering=answering), False


def _corrections(job: Callable[[SiteRows, ModelRequest], tuple[dict[str, Any], dict[str, str]]]
                 ) -> Work:
    """The adapt and evaluate replies: aggregate scores, the site's model in words."""

    def work(msg: Message, rows: SiteRows, request: ModelRequest) -> tuple[Message, bool]:
        metrics, texts = job(rows, request)
        return build_reply(
            msg, shared_features=rows.schema.shared_features, metrics=metrics,
            site={protocol.SITE_NAME: rows.site.name,
                  protocol.SITE_FEATURES: ",".join(rows.site.site_features), **texts},
        ), False

    return work


_adapt = _corrections(adapt_job)
_evaluate = _corrections(evaluate_job)


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Phase 1: aggregate counts and sums of the training rows' shared features."""
    return _respond(msg, context, "stats", _stats)


@app.query("secagg")
def secure(msg: Message, context: Context) -> Message:
    """A stage of a secure sum: keys, shares, the masked stats or train reply, unmasking."""
    return _secure(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Phase 2: one round of local training of the source model."""
    return _respond(msg, context, "train", _train)


@app.query("adapt")
def adapt(msg: Message, context: Context) -> Message:
    """Phase 3: fit and store the private correction; reply with its scores only."""
    return _respond(msg, context, "adapt", _adapt)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Phase 4: held-out metrics of the local-only, source and adapted models."""
    return _respond(msg, context, "evaluate", _evaluate)
