"""The folders are the architecture: which room may import which (checked on the source)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Which rooms each room may import besides itself (docs/architecture.md, "Folders are the
# architecture"). Lower rooms first; a room never imports one listed after it.
ALLOWED: dict[str, set[str]] = {
    "shared": set(),
    "client": {"shared"},
    "server": {"shared"},
    "executor": {"client", "shared"},
    "deploy": {"client", "server", "shared"},
    "simulations": {"deploy", "client", "server", "shared"},
    "bench": {"simulations", "deploy", "client", "server", "shared"},
    "drills": {"simulations", "deploy", "executor", "client", "server", "shared"},
    "fedadapt": {"bench", "drills", "simulations", "deploy", "executor", "client", "server",
                 "shared"},
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


def _room_imports() -> dict[str, set[str]]:
    """Which other rooms each room's source imports."""
    return {room: set().union(*(_imports(p) for p in (REPO / room).rglob("*.py"))) - {room}
            for room in ALLOWED}


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_a_room_imports_only_what_the_table_allows(room: str) -> None:
    """Server and client never import each other; no room imports the command."""
    offenders = {
        str(path.relative_to(REPO)): sorted(_imports(path) - ALLOWED[room] - {room})
        for path in (REPO / room).rglob("*.py")
        if _imports(path) - ALLOWED[room] - {room}
    }
    assert not offenders, offenders


def test_every_top_level_package_folder_is_a_room_of_the_table() -> None:
    """A new top-level package must be given its place (and its imports) in the table."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages == set(ALLOWED)


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """A cycle of ``graph`` (rooms, in order), or an empty list when it has none."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return [*path[path.index(node):], node]
        if node in done:
            return []
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return []

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return []


def test_no_import_cycle_between_rooms() -> None:
    """Neither the table nor the source lets two rooms depend on each other, even round about."""
    order = list(ALLOWED)  # lower rooms first: every allowed import points down the table
    assert all(order.index(d) < order.index(r) for r, deps in ALLOWED.items() for d in deps)
    assert _cycle(ALLOWED) == []
    assert _cycle(_room_imports()) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check


def test_the_architecture_doc_lists_every_room_with_its_imports() -> None:
    """docs/architecture.md's folder table has one row per room, its imports as in ALLOWED."""
    doc = (REPO / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)/` \|.*\| ([^|]*) \|$", doc, flags=re.MULTILINE))
    assert set(rows) == set(ALLOWED)
    for room, allowed in ALLOWED.items():
        listed = set(re.findall(r"`(\w+)`", rows[room]))
        assert listed == allowed, (room, listed)


def test_the_app_bundle_ships_only_the_site_and_coordinator_code() -> None:
    """`flwr run .` sends shared/, server/, client/ code and schemas, nothing else.

    Never the site's executor, benchmarks, drills, simulations or data.
    """
    import io
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))) as fab:
        names = [n for n in fab.namelist() if not n.startswith(".info/")]
    rooms = {n.split("/", 1)[0] for n in names if "/" in n}
    assert rooms == {"shared", "server", "client"}, rooms
    assert all(n.endswith((".py", ".toml")) for n in names), names


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
