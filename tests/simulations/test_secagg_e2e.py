"""A whole run with secure aggregation: the same optimum as without, each site's audit."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.generator import generate
from simulations.inprocess import run_app_in_process


def test_newton_with_secagg_reaches_the_plain_runs_optimum_in_the_same_rounds(
        tmp_path: Path) -> None:
    """Same rounds, held-out log-loss within 1e-4; the sites' audits show masked replies."""
    manifest = generate(tmp_path / "data", n_sites=4, seed=5)
    config = {"sites-manifest": str(manifest), "num-server-rounds": 10, "min-sites": 3,
              "cv-folds": 3}
    plain = run_app_in_process(config, 4, tmp_path / "plain")
    secure = run_app_in_process({**config, "secagg": True}, 4, tmp_path / "secure")
    assert plain["converged_rounds"] == secure["converged_rounds"] != [None]
    assert len(plain["rounds"]) == len(secure["rounds"])
    for a, b in zip(plain["rounds"], secure["rounds"], strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-6
    source = [r["summary"]["methods"]["source"]["log_loss"] for r in (plain, secure)]
    assert abs(source[0] - source[1]) < 1e-4
    assert secure["config"]["secagg"] is True and 0 < secure["secagg"]["error_bound"] < 1e-4
    assert all(s["status"] == "ok" for s in secure["sites"].values())
    assert any("feature groups were not trained" in n for n in secure["notes"])
    assert not plain["notes"]
    audit = tmp_path / "secure" / "sites" / "hospital-a" / "audit.jsonl"
    entries = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines()]
    masked = [e for e in entries if e.get("secagg", {}).get("masked")]
    rounds = len(secure["rounds"])
    assert len(masked) == 1 + rounds  # the stats phase and every training round
    assert all(e["type"] == "query.secagg" and set(e["arrays"]["arrays"]) == {"masked"}
               for e in masked)
    assert not [e for e in entries if e["type"] in ("train", "query.stats")]
    # Key pairs for every sum of the repeat were made at once: one keys exchange in all.
    assert [e.get("secagg", {}).get("stage") for e in entries].count("keys") == 1


def test_under_record_level_dp_each_site_still_accounts_its_own_epsilon(
        tmp_path: Path) -> None:
    """Record-level DP with secagg: DP-SGD at each site before masking, every epsilon said."""
    manifest = generate(tmp_path / "data", n_sites=3, seed=5)
    report = run_app_in_process({"sites-manifest": str(manifest), "num-server-rounds": 2,
                                 "dp": "record", "secagg": True, "cv-folds": 3}, 3,
                                tmp_path / "out")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    spent = {name: site["dp"]["epsilon"] for name, site in report["sites"].items()}
    assert len(spent) == 3 and all(0 < e <= 3.0 for e in spent.values())
    assert all(r["secagg"]["sites"] == 3 for r in report["rounds"])
