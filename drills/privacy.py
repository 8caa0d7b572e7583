"""Drill: a site whose privacy budget runs out mid-training stops; the others finish."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from client.ledger import LEDGER
from client.site import read_manifest, write_manifest
from drills.base import DrillResult, Engine, drill, simulate_with_faults
from shared.settings import RunSettings
from simulations.generator import generate

ROUNDS = 6
EPSILON = 3.0
TOTAL = 4.0  # hospital-b's policy: max-epsilon-total
EARLIER = 2.5  # what hospital-b's ledger says an earlier run spent
STOPPER = "hospital-b"
BUDGET = (f"with dp = record (epsilon {EPSILON:g} per run, {ROUNDS} Newton rounds), "
          f"hospital-b, whose ledger holds epsilon {EARLIER:g} from an earlier run and whose "
          f"policy allows {TOTAL:g} in total, trains at least one round, then refuses with "
          "rule 'max-epsilon-total' and is reported stopped with its epsilon (earlier + this "
          f"run <= {TOTAL:g}); the other sites spend at most {EPSILON:g} (within 0.05 of it) "
          "and the run completes with every site evaluated")


def _ledger(spent: float) -> dict[str, Any]:
    """A ledger as client.privacy writes it, with one earlier run (run id 1)."""
    return {"version": 1, "runs": {"1": {
        "history": [[1.0, 1.0, 1]], "delta": 1e-5, "budget": spent, "epsilon": spent,
        "rounds": ["0/1"], "updated": "2026-11-01T00:00:00+0000"}},
        "total-epsilon": spent, "total-delta": 1e-5}


@drill("dp-budget", BUDGET, "simulation")
def dp_budget(out: Path, engine: Engine = "simulation") -> DrillResult:
    """Four generated hospitals with record-level DP; one has little budget left.

    Parameters
    ----------
    out : Path
        The drill's folder (data, policy, run outputs, the sites' private folders).
    engine : {"simulation", "in-process"}
        Where the runs happen (``drills.base.simulate_with_faults``).

    Returns
    -------
    DrillResult
        Figure: epsilon per site, hospital-b's stop (round, rule) and its total.
    """
    for folder in (out / "data", out / "run"):
        if folder.exists():
            shutil.rmtree(folder)
    manifest = read_manifest(generate(out / "data", n_sites=4, seed=42))
    policy = out / "policies" / f"{STOPPER}.toml"
    policy.parent.mkdir(parents=True, exist_ok=True)
    policy.write_text(f"# this site's patients may be spent on up to epsilon {TOTAL:g}\n"
                      f"max-epsilon-total = {TOTAL}\n", encoding="utf-8")
    rows = []
    for site in manifest.sites:
        row: dict[str, Any] = {"name": site.name, "data-file": site.data_file.name,
                               "site-features": list(site.site_features)}
        if site.name == STOPPER:
            row["policy"] = str(policy.resolve())
        rows.append(row)
    path = write_manifest(manifest.path, manifest.schema, rows,
                          comment="dp-budget drill: hospital-b has little privacy budget left")
    site_dir = out / "run" / "sites" / STOPPER  # where a simulated site keeps its folder
    site_dir.mkdir(parents=True)
    (site_dir / LEDGER).write_text(json.dumps(_ledger(EARLIER)), encoding="utf-8")
    report = simulate_with_faults(
        out / "run", path, RunSettings(num_server_rounds=ROUNDS, dp="record",
                                       dp_epsilon=EPSILON), faulty=False, engine=engine)
    sites = report["sites"]
    dp = {name: s.get("dp") or {} for name, s in sites.items()}
    b = dp.get(STOPPER, {})
    stopped = b.get("stopped") or {}
    ledger = json.loads((site_dir / LEDGER).read_text(encoding="utf-8"))
    total_b = float(ledger.get("total-epsilon", 0.0))
    others = {n: d.get("epsilon") for n, d in dp.items() if n != STOPPER}
    evaluated = sorted(n for n, s in sites.items() if s.get("metrics"))
    passed = bool(
        b.get("per_round") and 1 < int(stopped.get("round", 0)) <= ROUNDS
        and "max-epsilon-total" in str(stopped.get("reason", ""))
        and float(b.get("epsilon") or 0) > 0 and total_b <= TOTAL + 1e-9
        and len(others) == 3
        and all(e is not None and EPSILON - 0.05 <= e <= EPSILON for e in others.values())
        and not any(d.get("stopped") for n, d in dp.items() if n != STOPPER)
        and len(evaluated) == 4
    )
    figure = {"epsilon": {n: d.get("epsilon") for n, d in dp.items()},
              "stopped": {"site": STOPPER, "round": stopped.get("round"),
                          "rule": "max-epsilon-total"
                          if "max-epsilon-total" in str(stopped.get("reason", "")) else None},
              "total_epsilon_b": total_b}
    observed = (f"{STOPPER}: trained {len(b.get('per_round', []))} round(s), epsilon "
                f"{b.get('epsilon')}, stopped at round {stopped.get('round')} "
                f"({str(stopped.get('reason', ''))[:120]}); ledger total {total_b:.3f}; "
                f"others' epsilon {others}; evaluated: {', '.join(evaluated)}")
    return DrillResult("dp-budget", BUDGET, observed, passed, figure,
                       {"dp": dp, "ledger": ledger})
