"""Attack 1: two stats requests with nested training sets, subtracted, give one patient's row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from client.audit_log import read_audit
from drills.curious import (
    World,
    base_config,
    deployed_site,
    differencing_stats,
    simulated_site,
)
from shared import protocol


def test_a_deployed_site_answers_the_same_whatever_split_it_is_asked_for(
    world: World, tmp_path: Path
) -> None:
    """The site's own split: the coordinator's split-seed and test-fraction select no row."""
    protected = differencing_stats(deployed_site(tmp_path / "site", world.without),
                                   world.schema, trials=5)
    control = differencing_stats(simulated_site(tmp_path / "sim", world.without),
                                 world.schema, trials=5)
    assert protected.successes == 0
    assert control.successes == 5  # the attack itself works where the run picks the split


def test_the_stats_are_a_fixed_answer_repeated_verbatim_and_audited_as_a_repeat(
    world: World, tmp_path: Path
) -> None:
    """Asked again with other settings: byte for byte the same numbers, noised once."""
    site = deployed_site(tmp_path / "site", world.without)
    first = site.ask("stats", base_config(world.schema))
    again = site.ask("stats", {**base_config(world.schema), "split-seed": 7,
                               "test-fraction": 0.9, "protocol": "flamby", "repeat": 3})
    assert not first.has_error() and not again.has_error()
    a, b = (dict(r.content.metric_records[protocol.METRICS]) for r in (first, again))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    entries = [e for e in read_audit(site.site_dir).entries if e.get("phase") == "stats"]
    assert [e.get("repeat", False) for e in entries] == [False, True]
    ledger = json.loads((site.site_dir / "privacy-ledger.json").read_text())
    assert len(ledger["releases"]) == 1  # the noisy release was paid for once


def test_under_require_dp_the_stats_carry_noise(world: World, tmp_path: Path) -> None:
    """Two sites with the same file and split key differ: the counts are released noisily."""
    site = deployed_site(tmp_path / "a", world.without)
    other = deployed_site(tmp_path / "b", world.without)
    (other.site_dir / "split.key").write_bytes((site.site_dir / "split.key").read_bytes())
    a, b = (dict(s.ask("stats", base_config(world.schema)).content
                 .metric_records[protocol.METRICS]) for s in (site, other))
    # A sum is noised continuously (equal by chance never) unless its noisy count was
    # clamped to no rows, which leaves the sum 0 at both.
    sums = [k for k in a if k.endswith(".sum") and min(
        np.asarray(r[k.replace(".sum", ".count")]).item() for r in (a, b)) > 0]
    assert sums and all(a[k] != b[k] for k in sums)
    # Rounded noisy counts: both label counts equal by chance about once in 10,000 times.
    assert (a["label-negative"], a["label-positive"]) != (b["label-negative"],
                                                          b["label-positive"])
