"""Run settings: read from Flower's run config (``[tool.flwr.app.config]``), checked once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

MODELS = ("logreg", "mlp")  # shared.source_model builds them; not imported here (torch)
STRATEGIES = ("fedavg", "fedprox", "fedmedian", "fedtrimmedavg")
PROTOCOLS = ("default", "flamby")
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


class SettingsError(ValueError):
    """Run settings that cannot be used; the message lists every problem."""


@dataclass(frozen=True)
class RunSettings:
    """Every setting of a run. Field ``a_b`` is run-config key ``a-b``.

    Attributes mirror ``[tool.flwr.app.config]`` in pyproject.toml, which documents them.
    """

    sites_manifest: str = "simulations/demo/sites.toml"
    schema: str = "synthetic"
    out: str = "fedadapt-out"
    seed: int = 42
    repeats: int = 1
    protocol: str = "default"
    test_fraction: float = 0.3
    num_server_rounds: int = 30
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    trim_beta: float = 0.25
    model: str = "logreg"
    hidden_units: int = 16
    local_epochs: int = 5
    learning_rate: float = 0.5
    batch_size: int = 0
    weight_decay: float = 0.001
    cv_folds: int = 5
    min_sites: int = 2
    expected_sites: int = 0
    node_wait_timeout: float = 60.0
    reply_timeout: float = 300.0
    record_replies: bool = False
    resume: bool = True

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
        if self.protocol not in PROTOCOLS:
            problems.append(f"protocol must be one of {', '.join(PROTOCOLS)}")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.model not in MODELS:
            problems.append(f"model must be one of {', '.join(MODELS)}")
        for name in ("repeats", "num_server_rounds", "local_epochs", "hidden_units", "min_sites"):
            if getattr(self, name) < 1:
                problems.append(f"{name.replace('_', '-')} must be at least 1")
        if not 0.0 <= self.trim_beta < 0.5:
            problems.append("trim-beta must be in [0, 0.5)")
        if self.expected_sites < 0:
            problems.append("expected-sites must not be negative (0: the same as min-sites)")
        if self.cv_folds < 2:
            problems.append("cv-folds must be at least 2")
        if not 0.0 < self.test_fraction < 1.0:
            problems.append("test-fraction must be between 0 and 1")
        for name in ("learning_rate", "node_wait_timeout", "reply_timeout"):
            if getattr(self, name) <= 0:
                problems.append(f"{name.replace('_', '-')} must be positive")
        for name in ("proximal_mu", "weight_decay", "batch_size"):
            if getattr(self, name) < 0:
                problems.append(f"{name.replace('_', '-')} must not be negative")
        return problems

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

    def to_run_config(self) -> dict[str, Any]:
        """The settings as run-config keys (kebab-case)."""
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}
