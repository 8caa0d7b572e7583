"""What every drill shares: its result, the registry, and a simulated federation with faults."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from client.site import read_manifest, write_manifest
from deploy.processes import APP_DIR
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.superlink import app_variant, run_app

log = logging.getLogger(__name__)

DRILLS: dict[str, Drill] = {}
# A site that finished a run: evaluated, or evaluated with its results kept at the site (it
# answers only under differential privacy, as a deployed site does by default).
FINISHED = ("ok", "withheld")


@dataclass
class DrillResult:
    """One line of ``drills.json``."""

    scenario: str
    expected: str  # filled in from the registry by the runner
    observed: str
    passed: bool
    figure: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""  # why the drill could not run here (then it neither passed nor failed)

    @classmethod
    def skip(cls, scenario: str, reason: str) -> DrillResult:
        """A drill this machine cannot run (no privileges, a missing tool), with the reason."""
        return cls(scenario, "", f"skipped: {reason}", False, {}, skipped=reason)

    def to_json(self) -> dict[str, Any]:
        """The contract's keys first (scenario, expected, observed, passed, figure)."""
        return {"scenario": self.scenario, "expected": self.expected,
                "observed": self.observed, "passed": self.passed, "figure": self.figure,
                "details": self.details, "skipped": self.skipped or None}


@dataclass(frozen=True)
class Drill:
    """A scenario: what should happen, and how to make it happen for real."""

    name: str
    expected: str
    run: Callable[[Path], DrillResult]
    engine: str  # "simulation" or "processes": where it runs, for people


def drill(name: str, expected: str, engine: str) -> Callable[
    [Callable[[Path], DrillResult]], Callable[[Path], DrillResult]
]:
    """Register a drill function under ``name``."""

    def register(fn: Callable[[Path], DrillResult]) -> Callable[[Path], DrillResult]:
        DRILLS[name] = Drill(name, expected, fn, engine)
        return fn

    return register


def federation(out: Path, n_sites: int = 4, seed: int = 42,
               faults: dict[str, str] | None = None) -> Path:
    """Generated hospitals in ``out/data`` with a manifest naming each site's drill fault."""
    if (out / "data").exists():
        shutil.rmtree(out / "data")
    manifest = read_manifest(generate(out / "data", n_sites=n_sites, seed=seed))
    rows = []
    for site in manifest.sites:
        row: dict[str, Any] = {"name": site.name, "data-file": site.data_file.name,
                               "site-features": list(site.site_features)}
        if faults and site.name in faults:
            row["drill-fault"] = faults[site.name]
        rows.append(row)
    return write_manifest(manifest.path, manifest.schema, rows,
                          comment="drill federation (generated hospitals, injected faults)")


def simulate_with_faults(
    out: Path, manifest: Path, settings: RunSettings, *, faulty: bool = True,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Run the real ServerApp in Flower's simulation engine; sites run the faulty ClientApp.

    Returns the report; raises ``SimulationError`` if the run itself failed.
    """
    sites = read_manifest(manifest)
    settings = replace(settings, sites_manifest=str(manifest.resolve()), schema=sites.schema,
                       expected_sites=len(sites.sites), out=str(out.resolve()))
    app = app_variant(out / "app", clientapp="drills.faulty_app:app") if faulty \
        else APP_DIR
    return run_app(settings.to_run_config(), len(sites.sites), out, timeout=timeout,
                   app_dir=app)
