"""What every drill shares: its result, the registry, and a simulated federation with faults."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from client.site import read_manifest, write_manifest
from deploy.processes import APP_DIR
from shared.settings import RunSettings
from simulations.generator import generate
from simulations.inprocess import run_app_in_process
from simulations.superlink import app_variant, run_app

log = logging.getLogger(__name__)

DRILLS: dict[str, Drill] = {}
# Where a "simulation" drill runs its federations: Flower's simulation engine (what `fedadapt
# drill` does), or the same ServerApp and ClientApps in this process (``InProcessGrid``: the
# drill's logic without Flower's processes, which is how the default tests run it).
Engine = Literal["simulation", "in-process"]
# The log files a run leaves in its folder, per engine (in-process there is no SuperLink).
RUN_LOGS: dict[Engine, tuple[str, ...]] = {
    "simulation": ("logs/flwr-run.log", "logs/superlink.log"),
    "in-process": ("logs/flwr-run.log",),
}
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
    # "simulation", "processes" or "in-process": where `fedadapt drill` runs it, for people.
    # A "simulation" drill's function also takes ``engine="in-process"`` (see ``Engine``).
    engine: str


DrillFunction = TypeVar("DrillFunction", bound=Callable[..., DrillResult])


def drill(name: str, expected: str, engine: str) -> Callable[[DrillFunction], DrillFunction]:
    """Register a drill function under ``name`` (it is returned unchanged)."""

    def register(fn: DrillFunction) -> DrillFunction:
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
    timeout: float = 900.0, engine: Engine = "simulation",
) -> dict[str, Any]:
    """Run the real ServerApp over the manifest's sites; they run the faulty ClientApp.

    Parameters
    ----------
    out : Path
        The run's folder.
    manifest : Path
        The sites manifest (a site's ``drill-fault`` is its fault).
    settings : RunSettings
        The run's settings (manifest, schema, expected sites and ``out`` are set here).
    faulty : bool
        Sites run ``drills.faulty_app`` (else fedadapt's own ClientApp).
    timeout : float
        Seconds before a run in Flower's engine is stopped and reported as failed.
    engine : {"simulation", "in-process"}
        Flower's simulation engine (a SuperLink, ``flwr run``, ray), or the same ServerApp and
        ClientApps in this process (``simulations.inprocess.run_app_in_process``).

    Returns
    -------
    dict
        The report. In Flower's engine a failed run raises ``FlowerRunError``; in-process,
        the ServerApp's own error is raised.
    """
    sites = read_manifest(manifest)
    settings = replace(settings, sites_manifest=str(manifest.resolve()), schema=sites.schema,
                       expected_sites=len(sites.sites), out=str(out.resolve()))
    if engine == "in-process":
        # Imported here: importing a ClientApp sets up logging (shared.logs), which the
        # `fedadapt drill` command must not have (it prints its own table).
        from client.client_app import app as real_app
        from drills.faulty_app import app as faulty_app

        return run_app_in_process(settings.to_run_config(), len(sites.sites), out,
                                  client_app=faulty_app if faulty else real_app)
    app = app_variant(out / "app", clientapp="drills.faulty_app:app") if faulty \
        else APP_DIR
    return run_app(settings.to_run_config(), len(sites.sites), out, timeout=timeout,
                   app_dir=app)
