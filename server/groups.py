"""The group phase: each feature group trains its extension by Newton over its own sites.

Between training and adapt. A group (``shared.groups``) is formed from the feature names the
sites gave in the stats phase; its preprocessing comes from its members' summaries of the
group's features, merged as the shared ones are. Its extension starts at zero (the source
model itself) and is trained with the same strategy, checks, audit and site policy as a
Newton training round; each message also carries the frozen source model, whose logit is
the offset.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from server.guarded import GuardedNewton
from server.sites import NotEnoughSites, SiteGrid
from shared import newton, protocol
from shared.groups import GROUP, SOURCE_ARRAYS, Extension, Group, form_groups, group_prior
from shared.preprocessing import TabularPreprocessor, merge_summaries, summary_keys

log = logging.getLogger(__name__)


# An extension's weight beyond this (on standardised inputs) is a diverging fit, not an
# effect: its training stops at the last accepted weights instead of sending it.
MAX_EXTENSION_WEIGHT = 1e3


class GroupNewton(GuardedNewton):
    """Newton steps of a group extension: each message also carries the frozen source model."""

    def __init__(self, *args: Any, source: ArrayRecord, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.source = source

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Newton's messages, each with the source model beside the extension's weights.

        None when the weights to send diverge (a source model whose logits saturate): the
        extension stays at its last accepted weights.
        """
        if np.max(np.abs(newton.parameters(arrays))) > MAX_EXTENSION_WEIGHT:
            log.warning("group round %d: the extension's weights diverge; it keeps its last "
                        "accepted ones", server_round)
            self.converged_round = server_round - 1
            return []
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for message in messages:
            message.content.array_records[SOURCE_ARRAYS] = self.source
        return messages


def groups_of(rep: Any) -> list[Group]:
    """The repeat's feature groups: from the sites' declared features, over healthy sites."""
    if not rep.settings.groups:
        return []
    healthy = {name: features for name, features in rep.site_features.items()
               if name in rep.names.values() and name not in rep.result.lost}
    order = [f.name for f in rep.schema.site_features]
    return form_groups(healthy, rep.settings.min_group_sites, order)


def group_phase(rep: Any, prep: TabularPreprocessor, source: ArrayRecord) -> list[Extension]:
    """Train every feature group's extension; return those trained (None is lost silently).

    A group whose members' summaries are missing, or whose training is refused or loses its
    sites, is left out with a note in the report; its members keep the other candidates.
    """
    groups = groups_of(rep)
    if rep.settings.secagg and rep.settings.min_group_sites:
        note = ("feature groups were not trained: under secure aggregation a site's own "
                "features are not sent (they would name it)")
        if note not in rep.result.notes:
            rep.result.notes.append(note)
    if not groups:
        return []
    rep.emit("phase", phase="groups")
    t = time.monotonic()
    out = []
    for group in groups:
        try:
            ext = _train_group(rep, prep, source, group)
        except NotEnoughSites as err:  # refused, or too few members left: the run goes on
            ext = None
            rep.result.notes.append(f"group {group.name}: not trained: {err}")
            rep.result.groups.append({"group": group.name, "features": list(group.features),
                                      "members": list(group.members), "skipped": str(err)})
            log.warning("group %s not trained: %s", group.name, err)
        if ext is not None:
            out.append(ext)
    rep.result.timing["groups"] = time.monotonic() - t
    return out


def _train_group(rep: Any, prep: TabularPreprocessor, source: ArrayRecord,
                 group: Group) -> Extension | None:
    s = rep.settings
    defs = rep.schema.resolve_site_features(list(group.features))
    keys = summary_keys(defs)
    nodes = {node: name for node, name in rep.names.items() if name in group.members}
    summaries = [rep.site_summaries[name] for name in group.members
                 if all(k in rep.site_summaries.get(name, {}) for k in keys)]
    record: dict[str, Any] = {"group": group.name, "features": list(group.features),
                              "members": list(group.members)}
    if len(summaries) < len(group.members):
        record["skipped"] = "a member's stats lack the group's features"
        rep.result.groups.append(record)
        return None
    group_prep = TabularPreprocessor(features=list(defs)).fit_summary(
        merge_summaries([{k: v for k, v in m.items() if k in keys} for m in summaries]))
    d = len(prep.feature_names_out_) + len(group_prep.feature_names_out_) + 1
    start = newton.to_arrays(np.zeros(d))
    # Two members are a group: training goes on without a member that is lost.
    grid = SiteGrid(rep.grid, nodes, rep.audit, min_sites=2, wait=s.node_wait_timeout,
                    names=nodes, first_reply_timeout=s.phase_timeout, window=s.max_in_flight)
    strategy = GroupNewton(
        source=source, shapes={newton.GRAD: (d,), newton.HESS: (d * (d + 1) // 2,)},
        site_names=nodes, weight_decay=s.weight_decay, tolerance=s.newton_tolerance,
        noisy=s.dp == "record", fraction_train=1.0, fraction_evaluate=0.0,
        min_train_nodes=2, min_available_nodes=2,
        weighted_by_key=protocol.NUM_EXAMPLES, arrayrecord_key=protocol.ARRAYS,
        configrecord_key=protocol.CONFIG,
    )
    strategy.start(grid=grid, initial_arrays=start, num_rounds=s.group_rounds,
                   timeout=s.reply_timeout, train_config=ConfigRecord({
                       **rep.base, "preprocessing": json.dumps(prep.to_dict()),
                       GROUP: json.dumps({"features": list(group.features),
                                          "preprocessing": group_prep.to_dict()}),
                       protocol.STRATEGY: "newton", "weight-decay": s.weight_decay,
                       **rep.dp_config,
                   }))
    if strategy.outcome.dp_spent:  # dp = "record": each member's epsilon after each round
        record["dp"] = {str(rnd): {site: {"epsilon": e, "delta": d}
                                   for site, (e, d) in spent.items()}
                        for rnd, spent in strategy.outcome.dp_spent.items()}
    lost = sorted(nodes[n] for n in grid.dropped)
    if lost:
        record["lost"] = lost
    if strategy.best is None or len(nodes) - len(lost) < 2:
        record["skipped"] = (f"too few sites answered its rounds (lost: {', '.join(lost)})"
                             if lost else "no round was accepted")
        rep.result.groups.append(record)
        return None
    theta = newton.parameters(strategy.best)
    rows = int(sum(sum(m["rows"]) for m in summaries))
    steps = strategy.steps
    gain, spread = group_prior(strategy.initial_losses, strategy.accepted_losses, d)
    record.update(rows=rows, rounds=len(steps), converged=strategy.converged_round is not None,
                  prior_gain=gain, prior_sd=spread,
                  loss=float(steps[-1]["loss"]) if steps else None,
                  effects={name: float(w) for name, w in zip(
                      group_prep.feature_names_out_, theta[len(prep.feature_names_out_):-1],
                      strict=True)})
    rep.result.groups.append(record)
    log.info("group %s (%d sites, %d rows): %d Newton round(s)", group.name, len(nodes), rows,
             len(steps))
    return Extension(group.features, group_prep.to_dict(), theta, len(nodes), rows,
                     gain if rep.settings.borrow_strength else None,
                     spread if rep.settings.borrow_strength else None)
