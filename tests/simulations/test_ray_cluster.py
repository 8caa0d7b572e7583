"""``fedadapt simulate --ray-address``: refusals at once; a run on a two-node Ray cluster."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from typer.testing import CliRunner

from deploy.process_guard import marked
from deploy.processes import flower_bin, free_port
from fedadapt.cli import app
from simulations.ray_cluster import RayClusterError, attach

# Every process of the test's Ray cluster carries this variable with a token of its own: the
# cluster is stopped by that token, never with `ray stop`, which stops every Ray instance of
# the machine (other tests' and other users' too).
CLUSTER_MARK = "FEDADAPT_TEST_RAY_CLUSTER"
NODE_TIMEOUT = 180.0  # for a node to start and join, on a busy two-core machine
RUN_TIMEOUT = 600.0


@pytest.mark.parametrize("address, expected", [
    ("nonsense", "give the head node's HOST:PORT"),
    ("head:99999", "give the head node's HOST:PORT"),
    ("auto", "may pick any Ray instance running on this machine"),
    ("ray://head:10001", "Ray Client addresses are not supported"),
])
def test_an_unusable_address_is_refused_at_once(address: str, expected: str) -> None:
    """A malformed address, Ray's 'auto' and Ray Client addresses are refused with the reason."""
    with pytest.raises(RayClusterError, match=expected):
        attach(address)


def test_no_cluster_at_the_address_ends_in_one_line(tmp_path: Path) -> None:
    """Nothing answers at the address: one line, exit 1, before anything is started or written."""
    address = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "o"), "--sites", "3",
                                      "--ray-address", address])
    assert result.exit_code == 1, result.output
    assert f"error: no Ray cluster at {address}: nothing answers" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def _stop_cluster(token: str, grace: float = 20.0) -> None:
    """Stop every process of the test's cluster (and the agents Ray starts unmarked)."""
    procs = {p.pid: p for p in marked(CLUSTER_MARK, token)}
    for p in list(procs.values()):
        with contextlib.suppress(psutil.Error):
            procs.update({c.pid: c for c in p.children(recursive=True)})
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


def _wait_for_nodes(address: str, nodes: int, proc: subprocess.Popen[Any], log: Path) -> None:
    """Wait until the cluster has ``nodes`` live nodes; skip if Ray cannot start here."""
    deadline = time.monotonic() + NODE_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = log.read_text(errors="replace").strip().splitlines() or ["no output"]
            pytest.skip(f"ray cannot start here (`ray start` exited {proc.returncode}: "
                        f"{lines[-1][:200]})")
        with contextlib.suppress(RayClusterError):
            if attach(address).nodes >= nodes:
                return
        time.sleep(2.0)
    pytest.skip(f"ray cannot start here: no {nodes} node(s) at {address} in {NODE_TIMEOUT:.0f} s")


@contextlib.contextmanager
def _two_node_cluster() -> Iterator[tuple[str, list[Path]]]:
    """A head and one worker node on this machine, one CPU each; yield the address, folders.

    Each node has its own short temporary folder (Ray's socket paths are limited in length)
    and free ports only (two nodes on one machine must not share Ray's fixed default ports).
    Everything the cluster started is stopped on exit, whatever happened.
    """
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({CLUSTER_MARK: token, "RAY_USAGE_STATS_ENABLED": "0"})
    folders = [Path(tempfile.mkdtemp(prefix="fa-ray-", dir="/tmp")) for _ in range(2)]
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen[Any]] = []
    try:
        for i, folder in enumerate(folders):
            role = (["--head", "--port", str(port), "--include-dashboard=false",
                     "--ray-client-server-port", str(free_port())] if i == 0
                    else ["--address", address])
            cmd = [flower_bin("ray"), "start", "--block", *role, "--num-cpus", "1",
                   "--temp-dir", str(folder), "--disable-usage-stats",
                   "--dashboard-agent-listen-port", str(free_port()),
                   "--dashboard-agent-grpc-port", str(free_port()),
                   "--metrics-export-port", str(free_port()),
                   "--runtime-env-agent-port", str(free_port())]
            log = folder / "ray-start.log"
            with log.open("w", encoding="utf-8") as sink:
                procs.append(subprocess.Popen(
                    cmd, env=env, stdout=sink, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True))
            _wait_for_nodes(address, i + 1, procs[-1], log)
        yield address, folders
    finally:
        _stop_cluster(token)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    left = marked(CLUSTER_MARK, token)
    assert not left, f"Ray processes of the test's cluster still running: {left}"


def _ran_actors(folder: Path) -> int:
    """How many ClientApp actors the node whose temporary folder this is ran (its logs)."""
    return sum(":actor_name:ClientAppActor" in f.read_text(errors="replace")
               for f in folder.glob("session_*/logs/worker-*.out"))


@pytest.mark.slow
@pytest.mark.full
@pytest.mark.timeout(int(2 * NODE_TIMEOUT + RUN_TIMEOUT + 120))
def test_simulate_runs_on_a_two_node_ray_cluster(tmp_path: Path, no_leftovers: None) -> None:
    """The sites run on both nodes of a running cluster, which fedadapt leaves running."""
    out = tmp_path / "out"
    with _two_node_cluster() as (address, folders):
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "fedadapt", "simulate", "--sites", "3", "--rounds", "2",
             "--out", str(out), "--ray-address", address],
            capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
            env={**os.environ, "COLUMNS": "160"},
        )
        took = time.monotonic() - started
        assert result.returncode == 0, f"after {took:.0f} s: {result.stdout}{result.stderr}"
        assert "ran on the Ray cluster at" in result.stdout
        report = json.loads((out / "report.json").read_text())
        assert report["config"]["ray-cluster"]["nodes"] == 2
        assert [s["status"] for s in report["sites"].values()] == ["ok"] * 3
        # fedadapt did not stop the cluster it attached to, and both nodes ran sites.
        assert attach(address).nodes == 2
        assert [_ran_actors(f) > 0 for f in folders] == [True, True]
