"""Tests of the run settings read from Flower's run config."""

import tomllib
from pathlib import Path
from typing import Any

import pytest

from shared.settings import FLAMBY_SPLIT_SEED, RunSettings, SettingsError

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _app_config() -> dict[str, Any]:
    content = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    return dict(content["tool"]["flwr"]["app"]["config"])


def test_defaults_equal_pyproject_run_config() -> None:
    """Every default equals [tool.flwr.app.config] in pyproject.toml, key for key."""
    config = _app_config()
    defaults = RunSettings().to_run_config()
    assert sorted(defaults) == sorted(config)
    for key, value in config.items():
        assert defaults[key] == value, key
        assert type(defaults[key]) is type(value), key
    assert RunSettings.from_run_config(config) == RunSettings()


def test_problems_are_reported_together() -> None:
    """An unknown key and several bad values raise one SettingsError listing every one."""
    bad = {
        "bogus-key": 1,
        "protocol": "fedheart",
        "strategy": "fedyogi",
        "model": "forest",
        "cv-folds": 1,
        "test-fraction": 1.5,
        "learning-rate": "fast",
        "seed": 1.5,
        "weight-decay": -0.1,
        "rounds": 3,
    }
    with pytest.raises(SettingsError) as err:
        RunSettings.from_run_config(bad)
    message = str(err.value)
    for part in (
        "unknown setting 'bogus-key'", "unknown setting 'rounds'", "protocol must be one of",
        "strategy must be one of", "model must be one of", "cv-folds must be at least 2",
        "test-fraction must be between 0 and 1", "learning-rate = 'fast'", "seed = 1.5",
        "weight-decay must not be negative",
    ):
        assert part in message, part
    assert message.count("\n  - ") == 10
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("key, value", [
    ("repeats", 0), ("num-server-rounds", 0), ("local-epochs", 0), ("hidden-units", 0),
    ("min-sites", 0), ("node-wait-timeout", 0.0), ("reply-timeout", -1.0),
    ("proximal-mu", -0.5), ("batch-size", -1), ("test-fraction", 0.0),
])
def test_each_bound_is_checked(key: str, value: Any) -> None:
    """Each out-of-bounds value is refused, naming its key."""
    with pytest.raises(SettingsError, match=key):
        RunSettings.from_run_config({key: value})


def test_kebab_snake_round_trip() -> None:
    """to_run_config gives kebab-case keys; reading them back gives the same settings."""
    settings = RunSettings.from_run_config({
        "num-server-rounds": 7, "proximal-mu": 0.01, "strategy": "fedprox", "model": "mlp",
        "protocol": "flamby", "seed": 3, "learning-rate": 1, "test-fraction": 0.25,
    })
    assert settings.num_server_rounds == 7
    assert settings.proximal_mu == 0.01
    assert isinstance(settings.learning_rate, float) and settings.learning_rate == 1.0
    config = settings.to_run_config()
    assert all("_" not in key for key in config)
    assert config["num-server-rounds"] == 7 and config["sites-manifest"] == settings.sites_manifest
    assert RunSettings.from_run_config(config) == settings


def test_split_seed() -> None:
    """FLamby's split seed is 43 + repeat whatever the seed; otherwise seed + repeat."""
    assert FLAMBY_SPLIT_SEED == 43
    for seed in (0, 42, 1000):
        flamby = RunSettings(protocol="flamby", seed=seed)
        assert [flamby.split_seed(r) for r in range(3)] == [43, 44, 45]
        default = RunSettings(protocol="default", seed=seed)
        assert [default.split_seed(r) for r in range(3)] == [seed, seed + 1, seed + 2]
