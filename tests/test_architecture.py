"""The folders are the architecture: which package may import which (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What each package may import of ours (docs/architecture.md, "Folders are the architecture").
ALLOWED = {
    "shared": {"shared"},
    "client": {"client", "shared"},
    "server": {"server", "shared"},
    "simulations": {"simulations", "client", "server", "shared"},
    "fedadapt": {"fedadapt", "simulations", "client", "server", "shared"},
}


def _imports(path: Path) -> set[str]:
    """Top-level names of every module imported by a file (also inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_layout_allows(package: str) -> None:
    """Server and client never import each other; no package imports the command."""
    offenders = {
        str(path.relative_to(REPO)): sorted(_imports(path) - ALLOWED[package])
        for path in (REPO / package).rglob("*.py")
        if _imports(path) - ALLOWED[package]
    }
    assert not offenders, offenders


def test_only_client_data_opens_patient_files() -> None:
    """One module reads site data: no other module of the site parses CSV files."""
    readers = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "client").rglob("*.py")
        if "csv.reader(" in p.read_text(encoding="utf-8")
    )
    assert readers == ["client/data.py"]


def test_every_reply_is_built_by_the_egress_module() -> None:
    """The ClientApp builds replies only through client.egress."""
    for path in (REPO / "client").rglob("*.py"):
        if path.name == "egress.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "Message":
                raise AssertionError(f"{path.relative_to(REPO)} builds a Message itself")


def test_docs_the_code_points_to_exist() -> None:
    """Every docs/*.md a module or test names is in the repository."""
    import re

    named = set()
    for package in [*ALLOWED, "tests"]:
        for path in (REPO / package).rglob("*.py"):
            named |= set(re.findall(r"docs/[\w-]+\.md", path.read_text(encoding="utf-8")))
    assert named, "the code should point to its docs"
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, missing


def test_only_the_contract_reads_what_the_coordinator_sends() -> None:
    """No site handler reads raw config: client.contract parses every message once.

    The reply builder reads the message only to know which reply shape it allows, and the
    audit log only to label a round.
    """
    readers = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "client").rglob("*.py")
        if "content.config_records" in p.read_text(encoding="utf-8")
    )
    assert readers == ["client/audit_log.py", "client/contract.py", "client/egress.py"]
