"""The README's two set-up commands, CI running the same test command, and lint/type checks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _commands() -> list[str]:
    """Indented command lines among the README's first lines."""
    head = (REPO / "README.md").read_text().splitlines()[:12]
    return [line.strip() for line in head if line.startswith("    ") and line.strip()]


def test_readme_starts_with_the_two_setup_commands() -> None:
    """First the main job (fedadapt simulate), then the tests (pytest)."""
    commands = _commands()
    assert len(commands) == 2
    assert commands[0].endswith("fedadapt simulate")
    assert commands[1].endswith("python -m pytest")
    assert all("pip install torch==2.13.0" in c for c in commands)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """.ci/run executes exactly the README's test command."""
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert _commands()[1] in [line.strip() for line in ci]


@pytest.mark.parametrize("tool", [["ruff", "check", "."], ["mypy"]])
def test_lint_and_types_are_clean(tool: list[str]) -> None:
    """Ruff and mypy, configured in pyproject.toml, report nothing."""
    exe = shutil.which(tool[0], path=str(Path(sys.executable).parent)) or shutil.which(tool[0])
    if exe is None:
        pytest.skip(f"{tool[0]} is not installed (pip install -e '.[dev]')")
    result = subprocess.run([exe, *tool[1:]], cwd=REPO, capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_the_coordinator_s_flwr_config_names_a_default_connection() -> None:
    """The deployment guide's config.toml sets [superlink] default: bare `flwr ls` works."""
    import re
    import tomllib

    text = (REPO / "docs" / "deployment.md").read_text()
    block = re.search(r"\n {7}\[superlink\]\n((?: {7}.*\n|\n)+)", text)
    assert block is not None, "docs/deployment.md should show config.toml's [superlink] table"
    config = tomllib.loads("[superlink]\n" + "\n".join(
        line[7:] for line in block.group(1).splitlines()))
    default = config["superlink"]["default"]
    assert set(config["superlink"][default]) == {"address", "root-certificates"}
