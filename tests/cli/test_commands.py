"""The command's options come from the run settings' one declaration; mistakes end in one line."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

from fedadapt.cli import SET_BY_COMMAND, app
from fedadapt.run_options import PREFIX
from shared.settings import RunSettings, key

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"
REPORT: dict[str, Any] = {"sites": {}, "summary": {}, "timing_s": {"total": 1.0}}


def _options(command: str) -> dict[str, click.Parameter]:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    cmd = group.commands[command]
    return {str(p.name): p for p in cmd.params if isinstance(p, click.Option)}


@pytest.mark.parametrize("command", ["simulate", "deploy-local"])
def test_every_run_setting_is_an_option_with_the_declared_default(command: str) -> None:
    """One option per setting (except those the command sets), its help and default shown."""
    options = _options(command)
    pyproject = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    for f in RunSettings.declared():
        option = options.get(PREFIX + f.name)
        if key(f) in SET_BY_COMMAND:
            assert option is None
            continue
        assert option is not None, f"--{key(f)} missing from {command}"
        assert option.opts[0] == f"--{key(f)}"
        help_text = option.help or ""
        # deploy-local's own defaults: sites take longer to start; deployed sites require DP.
        own = {"node-wait-timeout": 120.0, "dp": "record"} if command == "deploy-local" else {}
        default = own.get(key(f), pyproject[key(f)])
        shown = str(default).lower() if isinstance(default, bool) else str(default)
        assert f"[default: {shown}]" in help_text.replace("\\[", "["), (key(f), help_text)
        for choice in f.metadata["choices"]:
            assert choice in help_text


def test_options_reach_the_run_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Given options become the run's settings; the rest keep their one declared default."""
    seen: dict[str, Any] = {}

    def fake(data: str, out: Path, settings: RunSettings, **kwargs: Any) -> dict[str, Any]:
        seen.update(settings=settings, data=data, n_sites=kwargs["n_sites"])
        return REPORT

    monkeypatch.setattr("simulations.simulate.simulate", fake)
    result = CliRunner().invoke(app, [
        "simulate", "--out", str(tmp_path / "o"), "--strategy", "fedprox", "--proximal-mu",
        "0.2", "--rounds", "7", "--min-sites", "3", "--no-resume", "--sites", "5"])
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert (settings.strategy, settings.proximal_mu, settings.num_server_rounds) == (
        "fedprox", 0.2, 7)
    assert (settings.min_sites, settings.resume, seen["n_sites"]) == (3, False, 5)
    assert settings.learning_rate == RunSettings().learning_rate


@pytest.mark.parametrize("args, expected", [
    (["simulate", "--strategy", "fedyogi"],
     "strategy must be one of auto, newton, fedavg, fedprox"),
    (["simulate", "--data", "heart:/nowhere", "--sites", "3"], "drop --sites"),
    (["simulate", "--rounds", "0"], "num-server-rounds must be at least 1"),
    (["deploy-local", "--sites", "2", "--min-sites", "0"], "min-sites must be at least 1"),
])
def test_bad_settings_end_in_one_clear_line(args: list[str], expected: str) -> None:
    """Bad values are refused before anything starts, with exit code 1 and no traceback."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", [["simulate"], ["generate"], ["deploy-local"], ["drill"]])
def test_out_naming_a_file_is_refused(command: list[str], tmp_path: Path) -> None:
    """--out that names an existing file: one line saying to name a folder."""
    file = tmp_path / "report.txt"
    file.write_text("keep me")
    extra = ["malformed-data"] if command == ["drill"] else []
    result = CliRunner().invoke(app, [*command, *extra, "--out", str(file)])
    assert result.exit_code == 1, result.output
    assert "is a file: name a folder" in result.output
    assert file.read_text() == "keep me"
    below = CliRunner().invoke(app, [*command, *extra, "--out", str(file / "sub" / "out")])
    assert below.exit_code == 1, below.output
    assert f"--out {file / 'sub' / 'out'}: {file} is a file" in " ".join(below.output.split())
    assert file.read_text() == "keep me"


@pytest.mark.parametrize("command", ["simulate", "generate"])
def test_zero_sites_is_refused(command: str, tmp_path: Path) -> None:
    """--sites 0: one line, exit code 1, nothing started."""
    result = CliRunner().invoke(app, [command, "--sites", "0", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip() == "error: --sites 0: generate at least 1 site"


def test_one_site_is_refused_at_once(tmp_path: Path) -> None:
    """Fewer sites than min-sites: refused before any process starts (not a 60 s wait)."""
    result = CliRunner().invoke(app, ["simulate", "--sites", "1", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "fewer than min-sites = 2" in result.output and "--min-sites 1" in result.output


def test_locations_and_brackets_are_printed_verbatim(tmp_path: Path) -> None:
    """A path with markup-like brackets and a file:line:column print as they are."""
    folder = tmp_path / "[bold]" / "[/x]:100:7"
    folder.mkdir(parents=True)
    path = folder / "site:100:7.csv"
    path.write_text("age,weight,height,systolic_bp,diabetes\n1,x,170,120,0\n")
    result = CliRunner().invoke(app, ["check-data", str(path)])
    assert result.exit_code == 1, result.output
    assert f"{path}:2:2 (column 'weight')" in result.output
    assert "\U0001f4af" not in result.output  # the 💯 emoji rich would put for :100:


def test_version_names_fedadapt_and_flower() -> None:
    """`fedadapt --version`: both versions, exit 0, nothing else run."""
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"fedadapt {version('fedadapt')} (flwr {version('flwr')})"


@pytest.mark.parametrize(("command", "argument"), [("app-hash", "PROJECT is the Flower app's"),
                                                   ("drill", "SCENARIOS are the drills")])
def test_a_commands_argument_is_explained_in_its_help(command: str, argument: str) -> None:
    """Typer shows no help beside an argument: the command's text explains it."""
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=100)
    assert argument in " ".join(result.stdout.split())


def test_no_setting_help_starts_with_a_settings_name_and_a_colon() -> None:
    """An option's help is a sentence ("With dp record, ..."), never "Dp record: ..."."""
    from shared.settings import RunSettings

    keys = {f.name.replace("_", "-") for f in RunSettings.declared()}
    for f in RunSettings.declared():
        label = f.metadata["help"].split(":")[0].split()
        assert not (len(label) <= 2 and label[0] in keys), f.name
