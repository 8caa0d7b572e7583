"""Test-wide settings: Flower never writes to ~/.flwr, checks for updates or installs packages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
HEART_DIR = REPO.parent / "shared" / "data" / "uci-heart-disease"


@pytest.fixture(autouse=True)
def _flower_env(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point FLWR_HOME at a temporary folder and turn off Flower's network habits."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Give this process the identity Flower gives a ServerApp, so messages can be built."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture
def heart_dir() -> Path:
    """The real UCI Heart Disease files beside the project; skip when they are absent."""
    if not (HEART_DIR / "processed.cleveland.data").is_file():
        pytest.skip(f"UCI Heart Disease files not found in {HEART_DIR}")
    return HEART_DIR


FLOWER_NAMES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr-simulation",
                "flwr-serverapp",
                "flwr-clientapp", "raylet", "gcs_server")


def _flower_processes() -> set[int]:
    """PIDs of Flower and ray processes running now."""
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(name in cmd for name in FLOWER_NAMES):
            found.add(p.info["pid"])
    return found


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fail if the test leaves a Flower or ray process behind."""
    before = _flower_processes()
    yield
    left = _flower_processes() - before
    assert not left, f"processes left running: {left}"
