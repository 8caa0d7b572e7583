"""Attack 5: deleting or rolling back the privacy ledger must not give the budget back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from client.ledger import LEDGER, reset
from drills.curious import (
    TARGET_AGE,
    Site,
    World,
    _newton_config,
    _threshold_model,
    deployed_site,
)
from shared import protocol


def _dp_round(site: Site, world: World, run_id: int) -> str:
    """One DP round of a run; '' when answered, else the refusal's rule."""
    prep, arrays = _threshold_model(world.schema, "age", TARGET_AGE - 0.25)
    reply = site.ask("train", _newton_config(world.schema, prep, **{
        "dp": "record", "dp-epsilon": 3.0, "dp-delta": 1e-5, "dp-clip": 1.0,
        "num-server-rounds": 1, "repeats": 1}), arrays, run_id=run_id)
    if not reply.has_error():
        return ""
    assert reply.error.code == protocol.REFUSED, reply.error.reason
    return str(reply.error.reason).split("policy rule '")[1].split("'")[0]


def test_a_deleted_or_restored_ledger_refuses_until_the_operator_resets_it(
    world: World, tmp_path: Path
) -> None:
    """Missing or older than the audit log says: refused; reset restores what was spent."""
    site = deployed_site(tmp_path / "site", world.without)
    assert _dp_round(site, world, run_id=1) == ""
    ledger = site.site_dir / LEDGER
    old = tmp_path / "old-ledger.json"
    shutil.copy(ledger, old)
    assert _dp_round(site, world, run_id=2) == ""
    spent = json.loads(ledger.read_text())["total-epsilon"]
    ledger.unlink()
    assert _dp_round(site, world, run_id=3) == "ledger"
    shutil.copy(old, ledger)  # an earlier copy put back
    assert _dp_round(site, world, run_id=3) == "ledger"
    restored = reset(site.site_dir)
    assert restored["total-epsilon"] == spent  # nothing given back
    # 0.5 (stats) + 3 + 3 spent of 10: a third run fits, a fourth would exceed the total.
    assert _dp_round(site, world, run_id=3) == ""
    assert _dp_round(site, world, run_id=4) == "max-epsilon-total"
    events = [e.get("event") for e in
              map(json.loads, (site.site_dir / "audit.jsonl").read_text().splitlines())]
    assert "ledger-reset" in events


def test_max_rounds_counts_across_runs_at_a_deployed_site(world: World, tmp_path: Path) -> None:
    """A new run id buys no rounds."""
    site = deployed_site(tmp_path / "site", world.without, "max-rounds = 2\n"
                         "max-epsilon-total = 100\nmax-epsilon-run = 3")
    assert [_dp_round(site, world, run_id=r) for r in (1, 2, 3)] == ["", "", "max-rounds"]
