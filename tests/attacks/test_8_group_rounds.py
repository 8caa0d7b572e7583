"""Attack 8: a feature group's round as a probe of a site-only feature (glucose)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from client.data import read_site_data
from client.split import keyed_split, split_key
from drills.curious import Site, World, base_config, deployed_site
from shared import newton, protocol
from shared.groups import GROUP, SOURCE_ARRAYS
from shared.preprocessing import TabularPreprocessor


def _glucose_site(world: World, folder: Path, policy: str = "") -> Site:
    """A deployed hospital that measures glucose (the generated hospital-c)."""
    site = deployed_site(folder, world.without.parent / "hospital-c.csv", policy)
    site.node_config["site-features"] = "glucose"
    return site


def _step(world: World, threshold: float, feature: str = "glucose"
          ) -> tuple[dict[str, Any], ArrayRecord, ArrayRecord]:
    """A group round whose extension is a step at ``glucose = threshold``, source all zero."""
    schema = world.schema
    shared = list(schema.shared_features)
    numeric = [f for f in shared if f.kind != "categorical"]
    prep = TabularPreprocessor.from_dict({
        "features": [f.name for f in shared], "indicators": False,
        "mean": [0.0] * len(numeric), "scale": [1.0] * len(numeric),
        "indicator_features": [], "n_samples_seen": 1}, shared)
    group_prep = {"features": [feature], "indicators": False, "mean": [threshold],
                  "scale": [1e-9], "indicator_features": [], "n_samples_seen": 1}
    d = len(prep.feature_names_out_)
    weights = np.zeros(d + 2)
    weights[d] = 100.0  # the glucose input
    config = {**base_config(schema), "preprocessing": json.dumps(prep.to_dict()),
              "strategy": "newton", "weight-decay": 0.0, "server-round": 1,
              GROUP: json.dumps({"features": [feature], "preprocessing": group_prep})}
    return config, newton.to_arrays(weights), newton.to_arrays(np.zeros(d + 1))


def _rows_above(site: Site, world: World, threshold: float) -> float:
    config, ext, source = _step(world, threshold)
    reply = site.ask("train", config, ext, extra={SOURCE_ARRAYS: source})
    assert not reply.has_error(), reply.error.reason
    # The bias entry of the gradient sum: sum of (p - y), p = 1 past the step, 1/2 before it.
    return float(reply.content.array_records[protocol.ARRAYS][newton.GRAD].numpy()[-1])


def test_without_dp_a_group_round_recovers_a_site_only_value_and_the_default_refuses_it(
    world: World, tmp_path: Path
) -> None:
    """A binary search over glucose finds the highest training value; the default refuses.

    As attack 2 does for age; the deployment's default policy (require-dp) refuses the round
    before any row is read.
    """
    open_site = _glucose_site(world, tmp_path / "open", "require-dp = false")
    low, high = 40.0, 600.0
    none_above = _rows_above(open_site, world, 10_000.0)
    for _ in range(30):
        mid = (low + high) / 2
        above = _rows_above(open_site, world, mid) - none_above
        low, high = (mid, high) if above > 0.25 else (low, mid)
    data = read_site_data(open_site.data_file, world.schema, ["glucose"])
    train = keyed_split(data, split_key(open_site.site_dir), 0.3).train
    truth = float(np.nanmax(data.features["glucose"].to_numpy()[train]))
    assert abs((low + high) / 2 - truth) < 0.01  # the control: the probe works without DP

    site = _glucose_site(world, tmp_path / "site")
    config, ext, source = _step(world, 100.0)
    reply = site.ask("train", config, ext, extra={SOURCE_ARRAYS: source})
    assert reply.has_error() and reply.error.code == protocol.REFUSED
    assert "require-dp" in str(reply.error.reason)


def test_a_group_round_about_a_feature_the_site_lacks_is_refused_naming_nothing_of_it(
    world: World, tmp_path: Path
) -> None:
    """A group the site is not in: refused by the contract; the name asked is not echoed."""
    site = _glucose_site(world, tmp_path / "site", "require-dp = false")
    config, ext, source = _step(world, 100.0, feature="hba1c")
    reply = site.ask("train", config, ext, extra={SOURCE_ARRAYS: source})
    assert reply.has_error()
    reason = str(reply.error.reason)
    assert "does not measure" in reason and "hba1c" not in reason
    # Weights beyond the contract's bound are refused before any row is read.
    config, _, source = _step(world, 100.0)
    d = len(newton.parameters(source))
    huge = ArrayRecord({"net.weight": Array(np.full((1, d), 1e9)),
                        "net.bias": Array(np.zeros(1))})
    reply = site.ask("train", config, huge, extra={SOURCE_ARRAYS: source})
    assert reply.has_error() and "at most" in str(reply.error.reason)
