"""What ``fedadapt bench`` measures: its parts and each part's own settings, checked at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from shared.settings import RunSettings

# Every part, in the order they run (docs/benchmarks.md says what each measures).
PARTS = ("rounds", "overhead", "scale", "site", "bytes", "choice", "deploy", "privacy",
         "nonlinear", "secagg", "bare")
DEFAULT_PARTS = ("rounds", "overhead", "scale", "site", "bytes")
# The site part (bench.big_site): sizes, measurements, and the bounds of one measurement.
SIZES = (10_000, 100_000, 1_000_000)
MEASURES = ("fit", "local", "predict")
TIME_LIMIT_S = 600.0  # a measurement running longer is stopped and reported as such
MEMORY_LIMIT_GIB = 8.0
PREDICT_ROWS_AT_MOST = 100_000  # predict's default size: the largest fit size, at most this
EPSILONS = (1.0, 3.0, 10.0)  # the privacy part's per-run epsilons
BARE_ROWS = 100  # random rows per node of the bare Flower app


@dataclass(frozen=True)
class BenchOptions:
    """The parts to run and their settings; the defaults are ``fedadapt bench``'s.

    Attributes
    ----------
    parts : tuple of str
        Parts to run (of :data:`PARTS`).
    heart : Path, optional
        Folder of the UCI Heart Disease files: the rounds, choice and nonlinear parts run on
        the heart data too.
    scale_sites, scale_rounds
        The scale part: numbers of generated sites, and training rounds.
    fit_rows, predict_rows : tuple of int
        The site part: training rows of the big site (fit and local), rows it scores
        (predict; by default the largest of ``fit_rows``, at most 100,000).
    site_measures : tuple of str
        The site part's measurements: ``fit`` (the model choice), ``local`` (the local-only
        model), ``predict``.
    site_features, site_seed, time_limit, memory_limit
        The big site's raw features and seed; bounds of one measurement (seconds, GiB).
    choice_splits, choice_generated_splits : int
        The choice part's seeded splits on the heart data and on the generated world.
    deploy_sites : int
        The deploy part's generated sites.
    data, splits, epsilons, stats_dp, settings
        The privacy part: its data (``synthetic``, ``heart:DIR`` or a folder with a sites
        manifest), seeded splits, per-run epsilons, whether to add sites whose policy requires
        DP, and the settings of its runs.
    nonlinear_splits : int
        The nonlinear part's seeded splits per data set.
    secagg_sites, secagg_ring, secagg_deployed
        The secagg part: numbers of in-process sites of one secure sum, each site's
        neighbours where the sites are more (SecAgg+'s ring), and whether to time a deployed
        round with and without secure aggregation.
    bare_deployed, bare_nodes, bare_rounds, bare_inputs, bare_rows, bare_poll_interval,
    bare_gateway, bare_timeout
        The bare part: deployed (TLS) instead of simulated, nodes, rounds, model inputs, rows
        per node, the ServerApp's polling (0: Flower's own), through fedadapt's gateway
        (deployed only), bound on the run in seconds.
    """

    parts: tuple[str, ...] = DEFAULT_PARTS
    heart: Path | None = None
    scale_sites: tuple[int, ...] = (10, 100, 1000)
    scale_rounds: int = 10
    fit_rows: tuple[int, ...] = SIZES
    predict_rows: tuple[int, ...] = ()
    site_measures: tuple[str, ...] = ("fit", "predict")
    site_features: int = 40
    site_seed: int = 0
    time_limit: float = TIME_LIMIT_S
    memory_limit: float = MEMORY_LIMIT_GIB
    choice_splits: int = 20
    choice_generated_splits: int = 10
    deploy_sites: int = 4
    data: str = "synthetic"
    splits: int = 20
    epsilons: tuple[float, ...] = EPSILONS
    stats_dp: bool = False
    settings: RunSettings = field(default_factory=RunSettings)
    nonlinear_splits: int = 10
    bare_deployed: bool = False
    bare_nodes: int = 10
    bare_rounds: int = 10
    bare_inputs: int = 20
    bare_rows: int = BARE_ROWS
    bare_poll_interval: float = 0.0
    bare_gateway: bool = False
    bare_timeout: float = 3600.0
    secagg_sites: tuple[int, ...] = (4, 10, 100, 1000)
    secagg_ring: int = 20
    secagg_deployed: bool = True

    def sizes(self, measure: str) -> tuple[int, ...]:
        """Rows of the big site for one measurement of the site part."""
        if measure != "predict":
            return self.fit_rows
        return self.predict_rows or (min(max(self.fit_rows), PREDICT_ROWS_AT_MOST),)

    def problems(self) -> list[str]:
        """What cannot run as given, one sentence each (empty when everything can)."""
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            return [f"unknown part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}"]
        checks = [
            (not self.parts, "--parts names no part"),
            (any(n < 2 for n in self.scale_sites) or self.scale_rounds < 1,
             "--scale-sites needs at least 2 sites each, --scale-rounds at least 1"),
            (not self.fit_rows or any(n < 100 for n in (*self.fit_rows, *self.predict_rows)),
             "--fit-rows and --predict-rows need at least 100 rows each"),
            (any(m not in MEASURES for m in self.site_measures),
             f"--site-measures takes {', '.join(MEASURES)}"),
            (self.site_features < 2 or self.time_limit <= 0 or self.memory_limit <= 0,
             "--site-features needs at least 2; --time-limit and --memory-limit must be "
             "positive"),
            (min(self.choice_splits, self.choice_generated_splits, self.nonlinear_splits,
                 self.splits, self.deploy_sites - 1) < 1,
             "every --*splits must be at least 1 and --deploy-sites at least 2"),
            (not self.epsilons or min(self.epsilons) <= 0, "every epsilon must be positive"),
            (min(self.bare_nodes, self.bare_rounds, self.bare_inputs, self.bare_rows) < 1
             or self.bare_poll_interval < 0 or self.bare_timeout <= 0,
             "--bare-nodes, --bare-rounds, --bare-inputs and --bare-rows must be at least 1, "
             "--bare-poll-interval at least 0 and --bare-timeout positive"),
            (any(n < 3 for n in self.secagg_sites) or self.secagg_ring < 2,
             "--secagg-sites needs at least 3 sites each, --secagg-ring at least 2"),
            (self.bare_gateway and not self.bare_deployed,
             "--bare-gateway is for the deployed bare app: add --bare-deployed"),
        ]
        return [message for failed, message in checks if failed]
