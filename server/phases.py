"""The four phases of one repeat, as the coordinator drives them: stats, train, adapt, evaluate."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from server.audit import ReplyLog
from server.groups import groups_of
from server.guarded import TrainingOutcome
from server.progress import Progress
from server.secagg import SecAggAborted
from server.secure_rounds import SECURE_SUM_NAME, SECURE_SUM_NODE, SecureChannel
from server.sites import SiteGrid, TrainingRefused, query_sites
from server.strategy import make_strategy
from server.summary import RepeatResult
from shared import protocol, summed
from shared.arrays import arrays_digest
from shared.dp_accounting import epsilon_spent
from shared.errors import FedadaptError
from shared.groups import GROUPS, Extension, extensions_json
from shared.preprocessing import TabularPreprocessor, merge_summaries, summary_keys
from shared.schema import Schema
from shared.settings import RunSettings
from shared.source_model import build_model, to_arrays

log = logging.getLogger(__name__)

# An error reply's reason starts with "[site NAME] " when the site knew its name.
SITE_NAMED = re.compile(rf"^\[site ({protocol.SITE_NAME_RULE})\] ")


class RunFailed(FedadaptError, RuntimeError):
    """The run cannot go on (no usable site, no trained model); the message says why."""


@dataclass
class Repeat:
    """What the phases of one repeat share."""

    grid: Grid
    schema: Schema
    settings: RunSettings
    progress: Progress
    audit: ReplyLog | None
    result: RepeatResult
    names: dict[int, str] = field(default_factory=dict)  # node id -> site name
    run_id: int = 0
    # Per site name: its site-only features' names and its summary of them (stats phase).
    site_features: dict[str, list[str]] = field(default_factory=dict)
    site_summaries: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    group_plan: list[list[str]] = field(default_factory=list)  # each group's features
    secure: SecureChannel | None = None  # secure aggregation's sums of this repeat

    @property
    def dp_config(self) -> dict[str, Any]:
        """What a site needs for record-level DP: its budget over every planned round.

        The planned rounds are the source model's and ``group-rounds`` for each group in
        ``group-plan`` whose features the site measures (it counts them itself).
        """
        s = self.settings
        return {"dp": s.dp, "dp-epsilon": s.dp_epsilon, "dp-delta": s.dp_delta,
                "dp-clip": s.dp_clip, "num-server-rounds": s.num_server_rounds,
                "repeats": s.repeats, "group-rounds": s.group_rounds,
                "group-plan": json.dumps(self.group_plan)}

    @property
    def base(self) -> dict[str, Any]:
        """What every message of the repeat tells the sites (no site-specific value)."""
        s = self.settings
        return {
            "schema": s.schema, "schema-digest": self.schema.digest(), "protocol": s.protocol,
            "split-seed": s.split_seed(self.result.repeat), "test-fraction": s.test_fraction,
            "model": s.model, "hidden-units": s.hidden_units, "cv-folds": s.cv_folds,
            "repeat": self.result.repeat, "run-id": self.run_id,
        }

    def emit(self, event: str, **fields: Any) -> None:
        """A progress event tagged with the repeat."""
        self.progress.emit(event, repeat=self.result.repeat, repeats=self.settings.repeats,
                           **fields)


def stats_phase(rep: Repeat, nodes: list[int]) -> TabularPreprocessor:
    """Phase 1: every site's counts and sums -> the global preprocessing."""
    rep.emit("phase", phase="stats")
    t = time.monotonic()
    content = RecordDict({protocol.CONFIG: ConfigRecord(rep.base)})
    total = None  # secure aggregation: the federation's summary, the only one received
    if rep.settings.secagg:
        replies, total = _secure_stats(rep, nodes, content)
    else:
        replies = query_sites(rep.grid, nodes, protocol.STATS, content,
                              rep.settings.phase_timeout, rep.audit, rep.settings.max_in_flight)
    expected = summary_keys(rep.schema.shared_features)
    summaries = []
    misfits = 0  # sites whose file or schema does not fit the run's schema
    for node in nodes:
        reply = replies.get(node)
        if reply is not None and reply.has_error() and reply.error.code in (
                protocol.DATA_ERROR, protocol.SCHEMA_MISMATCH):
            misfits += 1
        if reply is None or reply.has_error():
            reason = "no reply in time" if reply is None else str(reply.error.reason)
            named = SITE_NAMED.match(reason)
            who = named.group(1) if named else f"node-{node}"
            reason = reason[named.end():] if named else reason
            rep.result.failures[who] = f"stats: {reason}"
            rep.result.nodes[who] = node
            log.warning("site %s failed the stats phase: %s", who, reason)
            continue
        name = str(reply.content.config_records[protocol.SITE][protocol.SITE_NAME])
        twin = next((n for n, known in rep.names.items() if known == name), None)
        if twin is not None:
            raise RunFailed(
                f"two sites call themselves {name!r} (nodes {twin} and {node}): every "
                "SuperNode needs its own site-name, the name its key was registered with "
                "(`flwr supernode register` printed each key's node id); correct the "
                "--node-config of one of them and restart it"
            )
        rep.names[node] = name
        rep.result.nodes[name] = node
        if total is not None:
            continue  # the masked reply: the site's name, its sums only inside the total
        metrics = reply.content.metric_records[protocol.METRICS]
        summary = {k: _as_list(metrics[k]) for k in expected if k in metrics}
        if len(summary) != len(expected):
            rep.result.failures[name] = "stats: reply lacks summary entries"
            del rep.names[node], rep.result.nodes[name]
            continue
        summaries.append(summary)
        site = reply.content.config_records[protocol.SITE]
        declared = [f for f in str(site.get(protocol.SITE_FEATURES, "")).split(",") if f]
        # A site-only feature counts for a group only with its whole summary.
        own = [f.name for f in _known(rep.schema, declared)
               if all(k in metrics for k in summary_keys([f])[1:])]
        rep.site_features[name] = own
        rep.result.site_features[name] = own
        rep.site_summaries[name] = {
            k: _as_list(metrics[k]) for k in summary_keys(_known(rep.schema, own))}
    for node, name in rep.names.items():  # key failures by name where the site told it
        if f"node-{node}" in rep.result.failures:
            rep.result.failures[name] = rep.result.failures.pop(f"node-{node}")
    if not rep.names and misfits == len(nodes) > 1:
        # Every site's data "fail" the same way: the run names the wrong schema, most likely.
        # Say so once, as the coordinator's mistake, not as errors to fix in every export.
        raise RunFailed(
            f"no site's data fit schema {rep.schema.name!r}, which this run names: check the "
            "run config's `schema` (it must be the schema the sites export to; "
            f"`fedadapt check-data --schema {rep.schema.name} FILE` at a site shows why). "
            "First site's answer: " + next(iter(rep.result.failures.values()))[:300])
    if not rep.names:
        raise RunFailed("no site passed the stats phase: " + "; ".join(
            f"{k}: {v}" for k, v in rep.result.failures.items()))
    prep = TabularPreprocessor(features=list(rep.schema.shared_features)).fit_summary(
        merge_summaries(summaries) if total is None else total
    )
    rep.result.timing["stats"] = time.monotonic() - t
    groups = groups_of(rep)
    rep.group_plan = [list(g.features) for g in groups]
    rep.emit("sites-named", names={str(node): name for node, name in rep.names.items()})
    for g in groups:
        log.info("feature group %s: %d sites (%s)", g.name, len(g.members), ", ".join(g.members))
    log.info("repeat %d: %d site(s) in the federation, %d model inputs", rep.result.repeat,
             len(rep.names), len(prep.feature_names_out_))
    return prep


def _secure_stats(rep: Repeat, nodes: list[int], content: RecordDict
                  ) -> tuple[dict[int, Message], dict[str, list[float]]]:
    """The stats phase as one secure sum: each site's masked reply (its name), the total.

    Raises
    ------
    RunFailed
        If the secure sum aborted (too few sites at a stage): nothing was aggregated.
    """
    s = rep.settings
    # One channel for the repeat: the sites make key pairs for the stats phase and every
    # training round at once (a keys exchange fewer per round).
    channel = rep.secure = _channel(s, rep.grid, rep.audit, s.phase_timeout,
                                    sums=1 + s.num_server_rounds)
    try:
        outcome = channel.run(nodes, "stats", content, {"phase": "stats"})
    except SecAggAborted as err:
        failures = "; ".join(f"{rep.names.get(n, f'node-{n}')}: {r.error.reason}"
                             for n, r in channel.outcome.replies.items() if r.has_error())
        raise RunFailed(f"the stats phase's {err}" + (f" ({failures})" if failures else "")
                        ) from None
    assert outcome.result is not None
    _secagg_figures(rep, channel)
    total = summed.stats_total(outcome.result.total, rep.schema.shared_features)
    # A site lost after masking is not in the total: it does not join the federation.
    replies = {n: r for n, r in outcome.replies.items()
               if r.has_error() or n in outcome.result.survivors}
    return replies, total


def _secagg_figures(rep: Repeat, channel: SecureChannel) -> None:
    """The repeat's largest error bound and summed value, with the channel's sums'."""
    rep.result.secagg_error_bound = max(rep.result.secagg_error_bound, channel.error_bound)
    rep.result.secagg_largest = max(rep.result.secagg_largest, channel.largest)


def _channel(s: RunSettings, grid: Grid, audit: ReplyLog | None, timeout: float,
             sums: int) -> SecureChannel:
    return SecureChannel(grid, threshold=s.secagg_threshold, neighbours=s.secagg_neighbours,
                         clip=s.secagg_clip, timeout=timeout, first_reply_timeout=s.phase_timeout,
                         window=s.max_in_flight, audit=audit, sums=sums)


RoundSaved = Callable[[int, ArrayRecord], None]


def train_phase(
    rep: Repeat, prep: TabularPreprocessor, start: ArrayRecord | None = None,
    done_rounds: int = 0, on_saved: RoundSaved | None = None,
) -> ArrayRecord:
    """Phase 2: federated training of the source model, from ``done_rounds`` on.

    ``start`` and ``done_rounds`` resume from a checkpoint; ``on_saved`` is called after each
    round with its number and the model (to write the checkpoint).
    """
    s = rep.settings
    if start is None:
        start = to_arrays(build_model(s.model, len(prep.feature_names_out_), s.hidden_units,
                                      seed=s.seed + rep.result.repeat))
    shapes = {k: tuple(start[k].shape) for k in start}
    # Before any site has answered a round, it waits up to the phase timeout (a busy machine
    # delays every site alike); after the first reply, reply-timeout counts from the last one.
    secure = rep.secure
    if secure is not None:
        secure.timeout = s.reply_timeout
    grid = SiteGrid(rep.grid, rep.names, rep.audit, min_sites=min(s.min_sites, len(rep.names)),
                    wait=s.node_wait_timeout, names=rep.names,
                    first_reply_timeout=s.phase_timeout, window=s.max_in_flight, secure=secure)
    current = [start]

    def on_round(rnd: int, arrays: ArrayRecord | None, metrics: MetricRecord | None,
                 rejected: list[str]) -> None:
        number = rnd + done_rounds
        current[0] = arrays if arrays is not None else current[0]
        dropped = sorted(rep.names.get(n, f"node-{n}") for n, (r, _) in grid.dropped.items()
                         if r == number)
        loss, gl = _scalar(metrics, "train-loss"), _scalar(metrics, "global-loss")
        if s.dp == "record" and s.training != "newton":
            loss = gl = None  # DP-SGD sites withhold their (noise-free) losses
        entry: dict[str, Any] = {"round": number, "loss": loss, "global_loss": gl,
                                 "rejected": rejected, "dropped": dropped}
        spent = strategy.outcome.dp_spent.get(rnd, {}) or grid.dp_spent.get(number, {})
        if number in grid.sums:  # secure aggregation: what the round's total is made of
            entry["secagg"] = grid.sums[number]
        if number in grid.aborted:
            entry_note = f"round {number}: {grid.aborted[number]}; the model was not updated"
            if entry_note not in rep.result.notes:
                rep.result.notes.append(entry_note)
        if spent:  # dp = "record": each site's epsilon spent in this run after this round
            entry["dp"] = {site: {"epsilon": e, "delta": d} for site, (e, d) in spent.items()}
        if s.dp == "client":  # the run's epsilon per site after this round's release
            entry["dp_client"] = client_dp_entry(s, strategy.outcome, rnd, number,
                                                 rep.result.repeat)
        accepted = _scalar(metrics, "step-accepted")  # strategy newton: were the weights kept
        if accepted is not None:
            entry["step_accepted"] = bool(accepted)
            entry["step"] = _scalar(metrics, "newton-step")
        rep.result.rounds.append(entry)
        rep.emit("round", round=number, rounds=s.num_server_rounds, loss=loss,
                 rejected=rejected, dropped=dropped,
                 epsilon={site: e for site, (e, _) in spent.items()})
        if on_saved is not None:
            on_saved(number, current[0])

    names = {**rep.names, SECURE_SUM_NODE: SECURE_SUM_NAME} if s.secagg else rep.names
    strategy = make_strategy(s, len(rep.names), shapes, names, on_round)
    rep.emit("phase", phase="train", from_round=done_rounds + 1)
    t = time.monotonic()
    remaining = s.num_server_rounds - done_rounds
    if remaining > 0:
        try:
            strategy.start(
                grid=grid, initial_arrays=start, num_rounds=remaining,
                timeout=s.reply_timeout,
                train_config=ConfigRecord({
                    **rep.base, "preprocessing": json.dumps(prep.to_dict()),
                    "local-epochs": s.local_epochs, "learning-rate": s.learning_rate,
                    "batch-size": s.batch_size, "weight-decay": s.weight_decay,
                    "round-offset": done_rounds, protocol.STRATEGY: s.training,
                    **rep.dp_config,
                }),
            )
        except TrainingRefused as err:
            # Their policies will not change during the run: training ends with the model so
            # far, and every site still fits its correction and is evaluated.
            note = f"repeat {rep.result.repeat + 1}: training ended early: {err}"
            log.warning("%s", note)
            rep.result.notes.append(note)
    outcome = strategy.outcome
    if outcome.best is not None:  # Newton ends on its last accepted weights
        current[0] = outcome.best
    converged = outcome.converged_round
    if converged is not None:
        rep.result.converged_round = converged + done_rounds
        rep.emit("converged", round=converged + done_rounds)
    rep.result.timing["train"] = time.monotonic() - t
    if secure is not None:
        _secagg_figures(rep, secure)
    for node, (rnd, reason) in grid.dropped.items():
        name = rep.names[node]  # the grid lists only the sites that passed the stats phase
        missed = [r for r in range(rnd, s.num_server_rounds + 1)]
        rep.result.lost[name] = {"round": rnd, "reason": reason, "rounds_missed": missed}
    if len(grid.dropped) == len(rep.names) and not grid.refused:
        raise RunFailed("every site was lost during training")
    rep.result.source_digest = arrays_digest(current[0])
    return current[0]


def client_dp_entry(settings: RunSettings, outcome: TrainingOutcome, rnd: int, number: int,
                    repeat: int) -> dict[str, Any]:
    """A round's client-level DP record: epsilon so far (Opacus' RDP), noise, sites averaged.

    Every round of every earlier repeat counts, whether or not it released a model
    (conservative); ``sites`` is 0 when nothing was aggregated (nothing released).

    Parameters
    ----------
    settings : RunSettings
        The run's settings.
    outcome : TrainingOutcome
        The strategy's (its noise multiplier and releases).
    rnd : int
        The round, as the strategy counts it (from 1 in this call of the strategy).
    number : int
        The round in the repeat (after a resumed checkpoint's rounds).
    repeat : int
        The repeat, from 0.

    Returns
    -------
    dict
        ``epsilon``, ``delta``, ``noise_multiplier``, ``clipping_norm``, ``sites``,
        ``noise_std`` (None when nothing was released).
    """
    z = float(outcome.noise_multiplier or 0.0)
    released = outcome.released.get(rnd)
    rounds = repeat * settings.num_server_rounds + number
    return {
        "epsilon": epsilon_spent([(z, 1.0, rounds)], settings.dp_delta),
        "delta": settings.dp_delta, "noise_multiplier": z, "clipping_norm": settings.dp_clip,
        "sites": released.sites if released else 0,
        "noise_std": released.noise_std if released else None,
    }


def site_phases(rep: Repeat, prep: TabularPreprocessor, model: ArrayRecord,
                extensions: Sequence[Extension] = ()) -> None:
    """Phases 3 and 4 at every connected site of the federation: corrections, evaluation.

    The messages carry the feature groups' ``extensions``; each site uses those of its groups.

    A site lost during training (it missed rounds) answers these phases too when it is back:
    the final source model is as good for it as for the others. A site that is not connected
    is not waited for.
    """
    content = RecordDict({protocol.ARRAYS: model, protocol.CONFIG: ConfigRecord({
        **rep.base, "preprocessing": json.dumps(prep.to_dict()),
        **({GROUPS: extensions_json(extensions)} if extensions else {}),
    })})
    for phase, mtype in (("adapt", protocol.ADAPT), ("evaluate", protocol.EVALUATE)):
        rep.emit("phase", phase=phase)
        t = time.monotonic()
        connected = set(rep.grid.get_node_ids())
        nodes = [n for n in rep.names if n in connected]
        for node in sorted(set(rep.names) - connected):
            name = rep.names[node]
            rep.result.failures.setdefault(name, f"{phase}: not connected")
            log.warning("site %s is not connected for the %s phase", name, phase)
        replies = query_sites(rep.grid, nodes, mtype, content, rep.settings.phase_timeout,
                              rep.audit, rep.settings.max_in_flight)
        for node in nodes:
            name = rep.names[node]
            reply = replies.get(node)
            if reply is None or reply.has_error():
                reason = "no reply in time" if reply is None else str(reply.error.reason)
                rep.result.failures.setdefault(name, f"{phase}: {reason}")
                log.warning("site %s failed the %s phase: %s", name, phase, reason)
                continue
            record = reply.content.config_records.get(protocol.SITE)
            said = record.get(protocol.SITE_NAME) if record is not None else None
            if said != name:
                rep.result.failures.setdefault(
                    name, f"{phase}: the node answered as site {said!r}, it joined as {name!r}")
                log.warning("node %d joined as site %s but answered %s as %r", node, name,
                            phase, said)
                continue
            if name in rep.result.lost:
                log.info("site %s, lost in round %d, is back for the %s phase", name,
                         rep.result.lost[name]["round"], phase)
            _record(rep.result, phase, name, reply)
        rep.result.timing[phase] = time.monotonic() - t
    if not rep.result.evaluate:
        raise RunFailed("no site answered the evaluate phase, so there is nothing to report: "
                        + "; ".join(f"{k}: {v}" for k, v in rep.result.failures.items()))



def _record(result: RepeatResult, phase: str, name: str, reply: Message) -> None:
    metrics: dict[str, Any] = {
        k: (float(v) if isinstance(v, int | float) else [float(x) for x in v])
        for k, v in reply.content.metric_records[protocol.METRICS].items()
        if isinstance(v, int | float | list)
    }
    site = reply.content.config_records.get(protocol.SITE)
    if phase == "adapt":
        result.adapt[name] = metrics
    else:
        result.evaluate[name] = metrics
    texts = {key: str(site[key]) for key in (protocol.CORRECTION_STATUS, protocol.MODEL_CHOICE,
                                              protocol.MODEL_REASON)
             if site is not None and key in site}
    if texts:
        result.texts[name] = texts
    if site is not None and protocol.SITE_FEATURES in site:
        result.site_features[name] = [f for f in str(site[protocol.SITE_FEATURES]).split(",") if f]


def _known(schema: Schema, names: list[str]) -> list[Any]:
    """The schema's site features among ``names`` (a name it lacks is not a group's)."""
    known = {f.name: f for f in schema.site_features}
    return [known[n] for n in names if n in known]


def _scalar(metrics: MetricRecord | None, key: str) -> float | None:
    value = metrics.get(key) if metrics is not None else None
    return float(value) if isinstance(value, int | float) else None


def _as_list(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else [float(value)]
