"""One fedadapt run, driven by the coordinator: stats, training, adaptation and evaluation."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.audit import ReplyLog
from server.progress import Progress
from server.sites import SiteGrid, query_sites, wait_for_sites
from server.strategy import make_strategy
from server.summary import RepeatResult, build_report
from shared import keys
from shared.preprocessing import TabularPreprocessor, merge_summaries, summary_keys
from shared.schema import Schema, load_schema
from shared.settings import RunSettings
from shared.source_model import arrays_digest, build_model, to_arrays

log = logging.getLogger(__name__)


class RunFailed(RuntimeError):
    """The run cannot go on (no usable site, no trained model); the message says why."""


def run_federation(
    grid: Grid, settings: RunSettings, progress: Progress, config_record: dict[str, Any],
    audit: ReplyLog | None = None,
) -> dict[str, Any]:
    """Run every repeat of the pipeline over the connected sites and return the report.

    Parameters
    ----------
    grid : Grid
        Flower's grid to the sites.
    settings : RunSettings
        The run's settings.
    progress : Progress
        Where progress events go.
    config_record : dict
        Everything to record under the report's ``config``.
    audit : ReplyLog, optional
        Where every reply received is recorded.

    Returns
    -------
    dict
        The report (see DESIGN.md, ``report.json``).
    """
    t0 = time.monotonic()
    schema = load_schema(settings.schema)
    progress.emit("waiting", min_sites=settings.min_sites)
    nodes = wait_for_sites(grid, settings.min_sites, settings.node_wait_timeout)
    progress.emit("sites", count=len(nodes))
    results = []
    for repeat in range(settings.repeats):
        results.append(_run_repeat(grid, nodes, schema, settings, progress, repeat, audit))
    return build_report(config_record, results, time.monotonic() - t0)


def _base_config(schema: Schema, settings: RunSettings, repeat: int) -> dict[str, Any]:
    """What every message of a repeat tells the sites (no site-specific value)."""
    return {
        "schema": settings.schema,
        "schema-digest": schema.digest(),
        "protocol": settings.protocol,
        "split-seed": settings.split_seed(repeat),
        "test-fraction": settings.test_fraction,
        "model": settings.model,
        "hidden-units": settings.hidden_units,
        "cv-folds": settings.cv_folds,
        "repeat": repeat,
    }


def _run_repeat(
    grid: Grid, nodes: list[int], schema: Schema, settings: RunSettings, progress: Progress,
    repeat: int, audit: ReplyLog | None,
) -> RepeatResult:
    result = RepeatResult(repeat=repeat, split_seed=settings.split_seed(repeat))
    base = _base_config(schema, settings, repeat)
    names: dict[int, str] = {}

    # Phase 1: aggregate counts and sums -> global preprocessing.
    progress.emit("phase", phase="stats", repeat=repeat, repeats=settings.repeats)
    t = time.monotonic()
    replies = query_sites(grid, nodes, keys.STATS, RecordDict({keys.CONFIG: ConfigRecord(base)}),
                          settings.reply_timeout, audit)
    summaries = []
    expected = summary_keys(schema.shared_features)
    for node in nodes:
        reply = replies.get(node)
        if reply is None or reply.has_error():
            reason = "no reply in time" if reply is None else str(reply.error.reason)
            result.failures[f"node-{node}"] = f"stats: {reason}"
            log.warning("site at node %d failed the stats phase: %s", node, reason)
            continue
        name = str(reply.content.config_records[keys.SITE][keys.SITE_NAME])
        metrics = reply.content.metric_records[keys.METRICS]
        summary = {k: _as_list(metrics[k]) for k in expected if k in metrics}
        if len(summary) != len(expected):
            result.failures[name] = "stats: reply lacks summary entries"
            continue
        names[node] = name
        summaries.append(summary)
    _rename_failures(result, names)
    if not names:
        raise RunFailed("no site passed the stats phase: " + "; ".join(
            f"{k}: {v}" for k, v in result.failures.items()))
    prep = TabularPreprocessor(features=list(schema.shared_features)).fit_summary(
        merge_summaries(summaries)
    )
    result.timing["stats"] = time.monotonic() - t
    log.info("repeat %d: %d site(s) in the federation, %d model inputs", repeat, len(names),
             len(prep.feature_names_out_))

    # Phase 2: federated training of the source model.
    model = build_model(settings.model, len(prep.feature_names_out_), settings.hidden_units,
                        seed=settings.seed + repeat)
    initial = to_arrays(model)
    shapes = {k: tuple(initial[k].shape) for k in initial}

    def on_round(rnd: int, metrics: MetricRecord | None, rejected: list[str]) -> None:
        loss = _scalar(metrics, "train-loss")
        gl = _scalar(metrics, "global-loss")
        result.rounds.append({"round": rnd, "loss": loss, "global_loss": gl,
                              "rejected": rejected})
        progress.emit("round", repeat=repeat, repeats=settings.repeats, round=rnd,
                      rounds=settings.num_server_rounds, loss=loss, rejected=rejected)

    strategy = make_strategy(settings, len(names), shapes, names, on_round)
    train_config = ConfigRecord({
        **base,
        "preprocessing": json.dumps(prep.to_dict()),
        "local-epochs": settings.local_epochs,
        "learning-rate": settings.learning_rate,
        "batch-size": settings.batch_size,
        "weight-decay": settings.weight_decay,
    })
    progress.emit("phase", phase="train", repeat=repeat, repeats=settings.repeats)
    t = time.monotonic()
    trained = strategy.start(
        grid=SiteGrid(grid, names, audit), initial_arrays=initial,
        num_rounds=settings.num_server_rounds, timeout=settings.reply_timeout,
        train_config=train_config,
    )
    final: ArrayRecord = trained.arrays
    if final is None or not result.rounds:
        raise RunFailed("training produced no model: every round failed")
    result.timing["train"] = time.monotonic() - t
    result.source_digest = arrays_digest(final)

    # Phases 3 and 4: private corrections, then held-out evaluation.
    content = RecordDict({keys.ARRAYS: final, keys.CONFIG: ConfigRecord({
        **base, "preprocessing": json.dumps(prep.to_dict()),
    })})
    for phase, mtype in (("adapt", keys.ADAPT), ("evaluate", keys.EVALUATE)):
        progress.emit("phase", phase=phase, repeat=repeat, repeats=settings.repeats)
        t = time.monotonic()
        replies = query_sites(grid, list(names), mtype, content, settings.reply_timeout, audit)
        for node, name in names.items():
            reply = replies.get(node)
            if reply is None or reply.has_error():
                reason = "no reply in time" if reply is None else str(reply.error.reason)
                result.failures.setdefault(name, f"{phase}: {reason}")
                log.warning("site %s failed the %s phase: %s", name, phase, reason)
                continue
            _record(result, phase, name, reply)
        result.timing[phase] = time.monotonic() - t
    return result


def _record(result: RepeatResult, phase: str, name: str, reply: Message) -> None:
    metrics = {k: float(v) for k, v in reply.content.metric_records[keys.METRICS].items()
               if isinstance(v, int | float)}
    site = reply.content.config_records.get(keys.SITE)
    if phase == "adapt":
        result.adapt[name] = metrics
    else:
        result.evaluate[name] = metrics
    if site is not None and keys.CORRECTION_STATUS in site:
        result.status[name] = str(site[keys.CORRECTION_STATUS])
    if site is not None and keys.SITE_FEATURES in site:
        result.site_features[name] = [f for f in str(site[keys.SITE_FEATURES]).split(",") if f]


def _rename_failures(result: RepeatResult, names: dict[int, str]) -> None:
    for node, name in names.items():
        if f"node-{node}" in result.failures:
            result.failures[name] = result.failures.pop(f"node-{node}")


def _scalar(metrics: MetricRecord | None, key: str) -> float | None:
    value = metrics.get(key) if metrics is not None else None
    return float(value) if isinstance(value, int | float) else None


def _as_list(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]


def resolve_out(out: str) -> Path:
    """The output folder: absolute, or relative to where the ServerApp runs."""
    return Path(out).expanduser().resolve()
