"""End to end in Flower's simulation engine (real SuperLink, ray): slow, bounded, leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.processes import APP_DIR, flower_bin
from simulations.superlink import simulation_superlink

# In the default run: `fedadapt simulate` end to end, and a killed command leaving nothing
# (one real-process smoke test each); the others only in the full run (-m full).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

def _fedadapt(*args: str, timeout: float = 360) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedadapt", *args], capture_output=True, text=True,
        timeout=timeout, check=False, env={**os.environ, "COLUMNS": "160"},
    )


def test_simulate_synthetic_from_the_command_line(tmp_path: Path, no_leftovers: None) -> None:
    """`fedadapt simulate` runs the pipeline and writes the report, table and plots."""
    out = tmp_path / "out"
    result = _fedadapt("simulate", "--sites", "3", "--rounds", "3", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hospital-c" in result.stdout and "held-out log-loss" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    for site in report["sites"].values():
        assert site["status"] == "ok"
        # "oracle" (the best achievable, from the generator's truth) exists on generated data.
        assert set(site["metrics"]) == {"local", "source", "adapted", "pooled", "oracle"}
        assert site["metrics"]["oracle"]["auc"] >= site["metrics"]["source"]["auc"] - 0.05
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert report["config"]["flwr_version"].startswith("1.4")
    assert report["summary"]["federated_vs_pooled"]["difference"] is not None
    assert (out / "report.md").stat().st_size > 1000
    for png in ("metrics.png", "loss.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The correction files exist only in each site's own folder.
    assert sorted(p.parent.parent.name for p in out.glob("sites/*/corrections/*.enc")) == [
        "hospital-a", "hospital-b", "hospital-c"]


@pytest.mark.full
def test_flamby_protocol_reproduces_the_test_split(
    tmp_path: Path, heart_dir: Path, no_leftovers: None
) -> None:
    """FLamby's rows and split: held-out sizes 104, 89, 16 and 45, majority baseline 0.721."""
    out = tmp_path / "out"
    result = _fedadapt("simulate", "--data", f"heart:{heart_dir}", "--protocol", "flamby",
                       "--rounds", "10", "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    sizes = {name: site["n_test"] for name, site in report["sites"].items()}
    assert sizes == {"cleveland": 104, "hungarian": 89, "switzerland": 16, "va": 45}
    # FLamby's baseline is over all four centres; the mean over judgeable ones is separate.
    assert abs(report["summary"]["majority_accuracy_all_sites"] - 0.721) < 0.001
    assert "switzerland" in report["summary"]["sites_too_small"]
    assert report["sites"]["cleveland"]["site_features"] == ["slope", "ca", "thal"]


@pytest.mark.full
def test_flwr_run_uses_the_pyproject_settings(tmp_path: Path, no_leftovers: None) -> None:
    """`flwr run` of the project with [tool.flwr.app.config] defaults runs the demo sites."""
    out = tmp_path / "out"
    with simulation_superlink(tmp_path / "logs") as (env, connection):
        result = subprocess.run(
            [flower_bin("flwr"), "run", str(APP_DIR), connection, "--stream",
             "--federation-config", "num-supernodes=8",
             "--run-config", f"out=\"{out}\" num-server-rounds=2"],
            cwd=APP_DIR, env=env, capture_output=True, text=True, timeout=300, check=False,
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["sites-manifest"] == "simulations/demo/sites.toml"
    assert sorted(report["sites"]) == [f"hospital-{c}" for c in "abcdefgh"]
    assert all(site["status"] == "ok" for site in report["sites"].values())


@pytest.mark.full
def test_a_run_stopped_with_flwr_stop_leaves_no_checkpoint(
    tmp_path: Path, no_leftovers: None
) -> None:
    """`flwr stop` mid-run: the ServerApp says "stopped", removes its checkpoint, no report."""
    import time

    from deploy.processes import start_run, stop_process
    from simulations.generator import generate

    out = tmp_path / "out"
    manifest = generate(tmp_path / "data", n_sites=2, seed=3)
    with simulation_superlink(tmp_path / "logs") as (env, connection):
        proc, _ = start_run(env, connection, {
            "sites-manifest": str(manifest), "num-server-rounds": 500, "out": str(out),
            "min-sites": 2}, out, extra=["--federation-config", "num-supernodes=2"])
        try:
            deadline = time.monotonic() + 180
            while not (out / "checkpoint" / "state.json").exists():
                assert time.monotonic() < deadline, "no round was checkpointed in 180 s"
                time.sleep(0.5)
            runs = json.loads(subprocess.run(
                [flower_bin("flwr"), "ls", connection, "--format", "json"], env=env,
                capture_output=True, text=True, timeout=60, check=True).stdout)["runs"]
            (run_id,) = [r["run-id"] for r in runs]
            subprocess.run([flower_bin("flwr"), "stop", str(run_id), connection], env=env,
                           capture_output=True, text=True, timeout=60, check=True)
            proc.wait(timeout=120)
        finally:
            stop_process(proc, "flwr run")
        status = json.loads(subprocess.run(
            [flower_bin("flwr"), "ls", connection, "--format", "json"], env=env,
            capture_output=True, text=True, timeout=60, check=True).stdout)["runs"][0]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "stopped", events[-1]
    assert "stopped" in status["status"], status
    assert not (out / "checkpoint").exists()
    assert not (out / "report.json").exists()


def _start_simulate(out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fedadapt", "simulate", "--sites", "2", "--rounds", "400",
         "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "160"})


def _wait_for_rounds(out: Path, proc: subprocess.Popen[str], timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = out / "events.jsonl"
        if events.exists() and '"event": "round"' in events.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    raise AssertionError("no training round within the time limit")


@pytest.mark.full
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_stop_everything_and_leave_no_complete_report(
    tmp_path: Path, no_leftovers: None, signal_name: str
) -> None:
    """As `timeout` or systemd would: "interrupted", exit 130, every process it started gone."""
    import signal

    out = tmp_path / "out"
    (out / "report.json").parent.mkdir(parents=True)
    (out / "report.json").write_text("{}")  # an earlier run's report must not survive either
    proc = _start_simulate(out)
    try:
        _wait_for_rounds(out, proc)
        proc.send_signal(getattr(signal, signal_name))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (out / "report.json").exists() and not (out / "report.md").exists()


def test_a_killed_command_leaves_no_process_behind(tmp_path: Path, no_leftovers: None) -> None:
    """SIGKILL cannot be caught: the command's watchdog stops what it started."""
    import signal

    proc = _start_simulate(tmp_path / "out")
    try:
        _wait_for_rounds(tmp_path / "out", proc)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
