"""Drill: sites whose own policy refuses a phase, or aggregates over too few rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from client.site import read_manifest, write_manifest
from drills.base import DrillResult, Engine, drill, simulate_with_faults
from shared.settings import RunSettings
from simulations.generator import generate

REFUSAL = ("hospital-c's policy leaves out the train phase and hospital-d's asks for more rows "
           "per aggregate than it has: each is refused with its rule named in the report "
           "(c: 'phases', from round 1; d: 'min-rows', at stats, status refused); hospital-c "
           "still adapts and is evaluated; hospital-a and -b finish with no refusal")
POLICIES = {
    "hospital-c": '# this site does not take part in training\nphases = ["stats", "adapt", '
                  '"evaluate"]\n',
    "hospital-d": "# every aggregate must rest on at least 100,000 rows\nmin-rows = 100000\n",
}


def _rules(site: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["phase"], r["rule"]) for r in site.get("refused", [])]


@drill("policy-refusal", REFUSAL, "simulation")
def policy_refusal(out: Path, engine: Engine = "simulation") -> DrillResult:
    """Four generated hospitals, two with a restrictive policy file in their manifest entry.

    Parameters
    ----------
    out : Path
        The drill's folder.
    engine : {"simulation", "in-process"}
        Where the runs happen (``drills.base.simulate_with_faults``).

    Returns
    -------
    DrillResult
        Figure: the refusals per site (phase, rule) and the sites evaluated.
    """
    manifest = read_manifest(generate(out / "data", n_sites=4, seed=42))
    rows = []
    for site in manifest.sites:
        row: dict[str, Any] = {"name": site.name, "data-file": site.data_file.name,
                               "site-features": list(site.site_features)}
        if site.name in POLICIES:
            path = out / "policies" / f"{site.name}.toml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(POLICIES[site.name], encoding="utf-8")
            row["policy"] = str(path.resolve())
        rows.append(row)
    path = write_manifest(manifest.path, manifest.schema, rows,
                          comment="policy-refusal drill: two sites with their own policy")
    report = simulate_with_faults(out / "run", path, RunSettings(num_server_rounds=5),
                                  faulty=False, engine=engine)
    sites = report["sites"]
    c, d = sites.get("hospital-c", {}), sites.get("hospital-d", {})
    ok = [n for n in ("hospital-a", "hospital-b")
          if sites.get(n, {}).get("status") == "ok" and not _rules(sites[n])]
    c_refusals = c.get("refused", [])
    passed = bool(
        ("train", "phases") in _rules(c) and c_refusals[0].get("round") == 1
        and c.get("status") == "ok" and c.get("metrics")
        and d.get("status") == "refused" and ("stats", "min-rows") in _rules(d)
        and len(ok) == 2
    )
    figure = {name: _rules(site) for name, site in sites.items()}
    observed = (f"refusals: c {_rules(c)} (status {c.get('status')}), d {_rules(d)} "
                f"(status {d.get('status')}); finished without refusal: {', '.join(ok)}")
    return DrillResult("policy-refusal", REFUSAL, observed, passed, figure, {
        "reasons": {n: [r["reason"] for r in s.get("refused", [])] for n, s in sites.items()}})
