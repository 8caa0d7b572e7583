"""Attack 4: a site that requires DP must not accept any epsilon the coordinator asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.ledger import LEDGER
from client.policy import PolicyError, read_policy
from drills.curious import (
    TARGET_AGE,
    World,
    _newton_config,
    _threshold_model,
    deployed_site,
)
from shared import protocol


def test_an_epsilon_of_a_billion_is_refused_by_the_default_policy_and_nothing_charged(
    world: World, tmp_path: Path
) -> None:
    """The deployment's defaults cap a run at epsilon 3 and all runs at 10."""
    site = deployed_site(tmp_path / "site", world.without)
    prep, arrays = _threshold_model(world.schema, "age", TARGET_AGE - 0.25)
    reply = site.ask("train", _newton_config(world.schema, prep, **{
        "dp": "record", "dp-epsilon": 1e9, "dp-delta": 1e-5, "dp-clip": 1.0,
        "num-server-rounds": 1, "repeats": 1}), arrays)
    assert reply.has_error() and reply.error.code == protocol.REFUSED
    assert "policy rule 'max-epsilon-run'" in str(reply.error.reason)
    ledger = site.site_dir / LEDGER
    assert not ledger.exists() or not json.loads(ledger.read_text())["runs"]


def test_a_policy_file_that_leaves_the_caps_out_takes_the_deployment_s_finite_ones(
    world: World, tmp_path: Path
) -> None:
    """`require-dp = true` (or only `approved-apps`) in the file: the caps are still 3 and 10."""
    site = deployed_site(tmp_path / "site", world.without)
    Path(site.node_config["policy"]).write_text("require-dp = true\n", encoding="utf-8")
    prep, arrays = _threshold_model(world.schema, "age", TARGET_AGE - 0.25)
    reply = site.ask("train", _newton_config(world.schema, prep, **{
        "dp": "record", "dp-epsilon": 1e9, "dp-delta": 1e-5, "dp-clip": 1.0,
        "num-server-rounds": 1, "repeats": 1}), arrays)
    assert reply.has_error() and "policy rule 'max-epsilon-run'" in str(reply.error.reason)


def test_a_policy_requiring_dp_with_an_infinite_cap_is_refused_when_read(tmp_path: Path) -> None:
    """Written by hand: one line, naming the file, line and column."""
    path = tmp_path / "policy.toml"
    path.write_text("require-dp = true\nmax-epsilon-total = inf\n", encoding="utf-8")
    with pytest.raises(PolicyError, match=r"policy.toml:2:1: require-dp needs a finite"):
        read_policy(path)
