"""Test-wide settings: Flower never writes to ~/.flwr, checks for updates or installs packages."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.process_guard import marked
from drills.base import Engine

REPO = Path(__file__).resolve().parent.parent
HEART_DIR = REPO.parent / "shared" / "data" / "uci-heart-disease"


def pytest_configure(config: pytest.Config) -> None:
    """``-m full`` is the full run: every test, not only those marked ``full``.

    The default run leaves the ``full`` tests out (``addopts`` in pyproject.toml); any other
    ``-m`` expression selects as usual.
    """
    if config.option.markexpr == "full":
        config.option.markexpr = "full or not full"


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
    from simulations.inprocess import task_identity as identity

    with identity(7):
        yield


@pytest.fixture
def heart_dir() -> Path:
    """The real UCI Heart Disease files beside the project; skip when they are absent."""
    if not (HEART_DIR / "processed.cleveland.data").is_file():
        pytest.skip(f"UCI Heart Disease files not found in {HEART_DIR}")
    return HEART_DIR


# Every process a test starts inherits the test's environment (Flower's SuperLink, the
# simulation, ray's workers, SuperNodes, ClientApps), so this mark finds exactly those, and never
# another user's or another test run's Flower processes.
MARK = "FEDADAPT_TEST_PROCESS"


@pytest.fixture
def no_leftovers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail if a process this test started is still running when it ends."""
    mark = uuid.uuid4().hex
    monkeypatch.setenv(MARK, mark)
    yield
    deadline = time.monotonic() + 10.0  # a process may need a moment to finish exiting
    left = marked(MARK, mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = marked(MARK, mark)
    assert not left, f"processes left running: {[(p.pid, p.name()) for p in left]}"


@pytest.fixture(params=[
    # The drill's logic over the real ServerApp and ClientApps in this process: seconds.
    pytest.param("in-process", marks=pytest.mark.timeout(300)),
    # As `fedadapt drill` runs it: a SuperLink, `flwr run`, ray (real processes, minutes).
    pytest.param("simulation", marks=[pytest.mark.slow, pytest.mark.full,
                                      pytest.mark.timeout(900)]),
])
def engine(request: pytest.FixtureRequest) -> Engine:
    """Where a simulation drill's federations run (``drills.base.simulate_with_faults``).

    Each such drill test runs twice: in-process in the default run, in Flower's engine in the
    full run.
    """
    engine: Engine = request.param
    return engine
