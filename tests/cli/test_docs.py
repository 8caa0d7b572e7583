"""Every command the README and docs/ show exists, with every option it is shown with."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import click
import pytest
import typer

from fedadapt.cli import app

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# Flower's own commands a page may show: their options are checked against their --help.
FLOWER = ("flower-superlink", "flower-supernode", "flwr")


def _shown_commands() -> list[tuple[str, int, str]]:
    """(page, line, command) of every command shown.

    Indented command lines (continuations joined), and every ``fedadapt ...`` or
    ``flwr ...`` in inline code (the README's table of commands).
    """
    found = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            for inline in re.findall(r"`((?:fedadapt|flwr) [^`]+)`", line):
                found.append((page.name, number, inline.replace("\\|", "|")))
        i = 0
        while i < len(lines):
            line = lines[i]
            start = i
            text = line.strip()
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1].rstrip() + " " + lines[i].strip()
            i += 1
            if not line.startswith("    "):
                continue
            text = re.sub(r"^(\(umask 077 && )?([A-Z_]+=\S+ )*(exec )?", "", text).rstrip(")")
            if text.split(" ", 1)[0] in ("fedadapt", *FLOWER):
                found.append((page.name, start + 1, text))
    return found


def _words(command: str) -> list[str]:
    """The command's words; a `# comment` and `[optional] | usage` forms are dropped."""
    command = command.split("  #", 1)[0]
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()


def _fedadapt_command(words: list[str]) -> click.Command:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    assert words[1] in group.commands, f"no command `fedadapt {words[1]}`"
    return group.commands[words[1]]


@cache
def _flower_help(program: str, sub: tuple[str, ...]) -> str:
    exe = Path(sys.executable).parent / program  # the environment's own Flower
    args = [str(exe), *sub, "--help"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    return done.stdout + done.stderr


COMMANDS = _shown_commands()


def test_the_pages_show_commands() -> None:
    """The README and the docs do show how to run things."""
    assert len(COMMANDS) > 40
    assert {page for page, _, _ in COMMANDS} >= {"README.md", "site-guide.md", "commands.md",
                                                 "deployment.md"}


@pytest.mark.parametrize(("page", "line", "command"), COMMANDS,
                         ids=[f"{p}:{n}" for p, n, _ in COMMANDS])
def test_a_shown_command_and_its_options_exist(page: str, line: int, command: str) -> None:
    """`fedadapt X --opt`: X is a command and --opt one of its options (Flower's: its help)."""
    words = _words(command)
    options = [w.split("=", 1)[0] for w in words if w.startswith("--")]
    if words[0] == "fedadapt":
        if words[1] == "COMMAND":  # "fedadapt COMMAND --help": the form, not a command
            return
        cmd = _fedadapt_command(words)
        known = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
        unknown = [o for o in options if o not in known and o not in ("--<run", "--help")]
        assert not unknown, f"{page}:{line}: `fedadapt {words[1]}` has no {unknown}"
        return
    sub: list[str] = []  # flwr's sub-commands: `flwr supernode register ...`
    for word in words[1:3] if words[0] == "flwr" else []:
        if not re.fullmatch(r"[a-z]+", word):
            break
        sub.append(word)
    help_text = _flower_help(words[0], tuple(sub))
    unknown = [o for o in options if o not in help_text]
    assert not unknown, f"{page}:{line}: `{' '.join([words[0], *sub])}` has no {unknown}"
