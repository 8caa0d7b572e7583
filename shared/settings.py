"""Run settings: read from Flower's run config (``[tool.flwr.app.config]``), checked once."""

from __future__ import annotations

from dataclasses import Field, asdict, dataclass, field, fields
from typing import Any

from shared.errors import FedadaptError

MODELS = ("logreg", "mlp")  # shared.source_model builds them; not imported here (torch)
STRATEGIES = ("auto", "newton", "fedavg", "fedprox", "fedmedian", "fedtrimmedavg")
PROTOCOLS = ("default", "flamby")
DP_MODES = ("off", "record", "client")
FLAMBY_SPLIT_SEED = 43


def _coerce(value: Any, default: bool | int | float | str) -> bool | int | float | str:
    """Convert a run-config value to the type of the setting's default, strictly."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError
        return value
    if isinstance(value, bool):
        raise TypeError("booleans are not numbers or strings here")
    if isinstance(default, str):
        if not isinstance(value, str):
            raise TypeError
        return value
    if not isinstance(value, int | float):
        raise TypeError
    if isinstance(default, int):
        if float(value) != int(value):
            raise ValueError
        return int(value)
    return float(value)


def key(f: Field[Any]) -> str:
    """The run-config key (kebab-case) of a setting's field."""
    return f.name.replace("_", "-")


class SettingsError(FedadaptError, ValueError):
    """Run settings that cannot be used; the message lists every problem."""


def _setting(default: bool | int | float | str, help: str, choices: tuple[str, ...] = ()) -> Any:
    """A run setting: its default, what it means (for ``--help``) and its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a run: the one place each is declared. Field ``a_b`` is key ``a-b``.

    ``[tool.flwr.app.config]`` in pyproject.toml holds the same defaults (a test checks it),
    the ``fedadapt`` command builds its options from these fields (help, defaults, choices),
    and the ServerApp reads them with :meth:`from_run_config`.
    """

    sites_manifest: str = _setting(
        "simulations/demo/sites.toml",
        "sites manifest (TOML) naming each simulated site's data file; a relative path "
        "resolves against the folder the SuperLink was started in")
    schema: str = _setting("synthetic", "data contract: a built-in schema name or a TOML file")
    out: str = _setting("fedadapt-out", "output folder of the coordinator (report, logs)")
    seed: int = _setting(42, "seed of data generation, splits and models")
    repeats: int = _setting(1, "seeded train/held-out splits; metrics are mean and sd over them")
    protocol: str = _setting(
        "default", "'default' (every row, imputed) or 'flamby' (FLamby's Fed-Heart-Disease "
        "rows and split)", PROTOCOLS)
    test_fraction: float = _setting(0.3, "share of each site's rows held out for evaluation")
    num_server_rounds: int = _setting(30, "federated training rounds")
    strategy: str = _setting(
        "auto", "training: newton (second-order steps from the sites' gradient and Hessian "
        "sums; model logreg only), fedavg, fedprox, fedmedian / fedtrimmedavg (limit one "
        "wildly wrong site); auto = newton for logreg, fedavg for the MLP and under "
        "dp record (DP-SGD kept the AUC; noisy Newton steps did not) and dp client", STRATEGIES)
    proximal_mu: float = _setting(0.0, "FedProx's proximal term (strategy fedprox)")
    newton_tolerance: float = _setting(
        1e-6, "with strategy newton, stop when the step's largest change of a weight is below this")
    trim_beta: float = _setting(0.25, "share of sites cut at each end (strategy fedtrimmedavg)")
    model: str = _setting("logreg", "source model: logistic regression or a one-hidden-layer "
                          "MLP", MODELS)
    hidden_units: int = _setting(16, "width of the MLP's hidden layer")
    local_epochs: int = _setting(5, "local epochs per round at each site")
    learning_rate: float = _setting(0.5, "local SGD learning rate")
    batch_size: int = _setting(0, "local mini-batch size (0: full batch)")
    weight_decay: float = _setting(0.001, "L2 penalty on the source model's weights")
    cv_folds: int = _setting(5, "cross-validation folds for choosing each site's correction")
    min_group_sites: int = _setting(
        2, "fewest sites measuring the same site-only feature that train a group extension "
        "together (Newton over those sites, the source model frozen; not under dp); 0: no "
        "groups")
    borrow_strength: bool = _setting(
        True, "a site may choose its group's extension on the group's evidence as well as its "
        "own: its cross-validated gain is shrunk towards the members' mean gain")
    group_rounds: int = _setting(
        10, "most Newton rounds of each group extension (it stops earlier once converged)")
    min_sites: int = _setting(
        2, "fewest sites to start (and go on) with; fewer is a clear error, never an endless "
        "wait")
    expected_sites: int = _setting(
        0, "sites to wait for before starting (0: min-sites), at most node-wait-timeout "
        "seconds")
    node_wait_timeout: float = _setting(60.0, "seconds to wait for the expected sites")
    reply_timeout: float = _setting(
        300.0, "seconds without any reply after which the sites that have not answered a "
        "training round sit out the rest of training (counted from the last reply: sites "
        "still answering, or queued behind others, are not lost)")
    phase_timeout: float = _setting(
        900.0, "seconds without any reply after which the stats, adapt and evaluate phases "
        "give up on the sites that have not answered (reading a file, cross-validating a "
        "correction)")
    max_in_flight: int = _setting(
        0, "most messages out to sites at once; 0: all (fedadapt simulate: 8 per CPU, as "
        "Flower's in-memory link state scans every waiting message for every site)")
    record_replies: bool = _setting(
        False, "record every value each site sent in OUT/replies.jsonl (keys, shapes and "
        "sizes are always recorded)")
    resume: bool = _setting(
        True, "resume an interrupted run from its last completed round (OUT/checkpoint/)")
    dp: str = _setting(
        "off", "differential privacy of training: off; record (each site clips every "
        "patient's contribution and adds Gaussian noise, accounting its own epsilon: a "
        "per-patient guarantee); client (Flower's client-side fixed clipping: a per-site "
        "guarantee, for federations with many sites)", DP_MODES)
    dp_epsilon: float = _setting(
        3.0, "with dp record, the epsilon one run may spend at each site; with dp client, the "
        "epsilon of the run's released models per site; over the planned rounds (the noise is "
        "calibrated from it)")
    dp_delta: float = _setting(1e-5, "with dp, the delta of the (epsilon, delta) guarantee")
    dp_clip: float = _setting(
        1.0, "with dp, the clipping norm of one patient's gradient (record) or of one site's "
        "update (client)")

    secagg: bool = _setting(
        False, "secure aggregation (SecAgg+): the coordinator receives every summed reply "
        "(stats sums, Newton sums, FedAvg / FedProx updates) masked, and learns only the "
        "federation's total; not with fedmedian, fedtrimmedavg, dp client or feature groups")
    secagg_threshold: float = _setting(
        0.67, "with secagg, the share of each site's neighbourhood (itself included) whose shares "
        "rebuild a lost site's masks; fewer survivors abort the round; at least 2/3 (a site "
        "refuses less: docs/privacy.md)")
    secagg_neighbours: int = _setting(
        0, "with secagg, each site's neighbours, half on each side of a ring of the sites "
        "(SecAgg+; a site's work grows with this, not with the federation); 0: every other "
        "site")
    secagg_clip: float = _setting(
        1e9, "with secagg, every summed value must lie in [-secagg-clip, secagg-clip] (a site "
        "refuses a reply that does not fit); the total is exact to (sites + 1) * clip / 2**52")

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> RunSettings:
        """Build from a run config; unknown keys and bad values are reported together.

        Raises
        ------
        SettingsError
            Listing every problem (key, what is wrong, what is allowed).
        """
        problems: list[str] = []
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            f = known.get(key)
            if f is None:
                problems.append(f"unknown setting {key!r}")
                continue
            default = f.default
            assert isinstance(default, int | float | str)  # every field has a plain default
            try:
                values[f.name] = _coerce(value, default)
            except (TypeError, ValueError):
                kind = {bool: "true or false", int: "an integer", float: "a number",
                        str: "a string"}[type(default)]
                problems.append(f"{key} = {value!r} is not {kind}")
        settings = cls(**values)
        problems += settings._check()
        if problems:
            raise SettingsError("bad run settings:\n" + "\n".join(f"  - {p}" for p in problems))
        return settings

    def _check(self) -> list[str]:
        problems = []
        for f in fields(self):
            choices = f.metadata["choices"]
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{key(f)} must be one of {', '.join(choices)}")
        for name in ("repeats", "num_server_rounds", "local_epochs", "hidden_units", "min_sites",
                     "group_rounds"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        if self.strategy == "newton" and self.model != "logreg":
            problems.append("strategy newton trains the logistic model only: use model logreg, "
                            "or strategy fedavg / fedprox for the MLP")
        if self.newton_tolerance <= 0:
            problems.append("newton-tolerance must be positive")
        if not 0.0 <= self.trim_beta < 0.5:
            problems.append("trim-beta must be in [0, 0.5)")
        if self.expected_sites < 0:
            problems.append("expected-sites must not be negative (0: the same as min-sites)")
        if self.cv_folds < 2:
            problems.append("cv-folds must be at least 2")
        if not 0.0 < self.test_fraction < 1.0:
            problems.append("test-fraction must be between 0 and 1")
        for name in ("learning_rate", "node_wait_timeout", "reply_timeout", "phase_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name.replace('_', '-')} must be positive")
        if self.dp == "client" and self.training not in ("fedavg", "fedprox"):
            problems.append(f"dp = client (client-level DP: Flower's client-side fixed clipping "
                            f"around a uniform average) needs strategy fedavg or fedprox, not "
                            f"{self.strategy}: a {self.training} reply is not a model update "
                            "whose norm can be clipped and averaged")
        if self.dp != "off" and (self.dp_epsilon <= 0 or self.dp_clip <= 0):
            problems.append("dp-epsilon and dp-clip must be positive")
        if not 0.0 < self.dp_delta < 1.0:
            problems.append("dp-delta must be between 0 and 1")
        for name in ("proximal_mu", "weight_decay", "batch_size", "max_in_flight",
                     "min_group_sites"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', '-')} must not be negative")
        problems += self._check_secagg()
        return problems

    def _check_secagg(self) -> list[str]:
        if not self.secagg:
            return []
        problems = []
        if not 2 / 3 - 0.01 < self.secagg_threshold <= 1.0:
            problems.append("secagg-threshold must be between 2/3 (0.67) and 1: a site "
                            "refuses a lower threshold")
        if self.secagg_neighbours < 0 or self.secagg_neighbours == 1:
            problems.append("secagg-neighbours must be 0 (every other site) or at least 2")
        if not 0.0 < self.secagg_clip <= 1e15:
            problems.append("secagg-clip must be positive and at most 1e15")
        if self.training in ("fedmedian", "fedtrimmedavg"):
            problems.append(f"secagg sums the sites' replies: strategy {self.training} needs "
                            "each site's reply, use newton, fedavg or fedprox")
        if self.dp == "client":
            problems.append("secagg with dp = client is not built: the coordinator clips and "
                            "noises per site; use dp = record (each site adds its own noise "
                            "before masking)")
        return problems

    @property
    def training(self) -> str:
        """The strategy that trains: ``strategy``, with ``auto`` resolved by model and DP.

        Under record-level DP, ``auto`` is FedAvg (DP-SGD): on the generated hospitals at the
        deployment's default budget, its many small noisy steps keep the source model's AUC
        close to the one without DP, where Newton's few noisy steps lose much of it (the
        figures: docs/benchmarks.md). Under client-level DP it is FedAvg too: the sites'
        clipped model updates are averaged.
        """
        if self.strategy != "auto":
            return self.strategy
        return "newton" if self.model == "logreg" and self.dp == "off" else "fedavg"

    @property
    def groups(self) -> bool:
        """Whether feature groups train extensions: with ``min-group-sites`` > 0 and DP off.

        Under client-level DP a reply is a clipped model update, not Newton's sums. Under
        record-level DP the group's few noisy Newton steps gave an extension worth nothing
        while taking rounds from the source model's budget (docs/benchmarks.md). Under
        secure aggregation a site's own features would name it, and a group's sums are not
        yet masked.
        """
        return self.min_group_sites > 0 and self.dp == "off" and not self.secagg

    @property
    def sites_to_wait_for(self) -> int:
        """How many sites the server waits for before starting (at least min-sites)."""
        return max(self.min_sites, self.expected_sites)

    def split_seed(self, repeat: int) -> int:
        """Seed of the sites' train/held-out split in repeat ``repeat``.

        FLamby's protocol fixes its split (seed 43); repeats move on from there.
        """
        base = FLAMBY_SPLIT_SEED if self.protocol == "flamby" else self.seed
        return base + repeat

    @classmethod
    def declared(cls) -> tuple[Field[Any], ...]:
        """Every setting's declaration (name, default, ``metadata["help"]`` and choices)."""
        return fields(cls)

    def to_run_config(self) -> dict[str, Any]:
        """The settings as run-config keys (kebab-case)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}
