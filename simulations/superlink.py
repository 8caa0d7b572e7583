"""Running the fedadapt Flower app in Flower's simulation engine, with a SuperLink of our own.

``flwr run`` with its default local connection starts a detached SuperLink on a fixed port
that outlives the run and is shared by later runs. A simulation here instead starts its own
``flower-superlink --simulation`` on a free loopback port, with a private ``FLWR_HOME``,
submits the run with ``flwr run`` (``deploy.processes.submit_run``), follows the ServerApp's
progress file, and stops the SuperLink (and with it the simulation engine) when the run ends,
fails or is interrupted.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from deploy.process_guard import guard
from deploy.processes import (
    APP_DIR,
    FLOWER_ENV,
    STARTUP_TIMEOUT,
    EventHook,
    FlowerRunError,
    flower_bin,
    free_port,
    spawn,
    stop_process,
    submit_run,
)

log = logging.getLogger(__name__)


class SimulationError(FlowerRunError):
    """The simulation's SuperLink did not start; the message says where its log is."""


def wait_healthy(port: int, proc: subprocess.Popen[Any], timeout: float, log_path: Path) -> None:
    """Wait until the SuperLink answers ``GET /health``; fail early if it exits."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SimulationError(
                f"the SuperLink exited with code {proc.returncode}; see {log_path}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise SimulationError(
        f"the SuperLink did not become healthy in {timeout:.0f} s; see {log_path}"
    )


@contextmanager
def simulation_superlink(
    logs: Path, *, ray_address: str | None = None,
) -> Iterator[tuple[dict[str, str], str]]:
    """Start a private simulation SuperLink; yield the environment and connection name for it.

    The SuperLink is stopped on exit, whatever happened inside the block.

    Parameters
    ----------
    logs : Path
        Folder for ``superlink.log``.
    ray_address : str, optional
        ``HOST:PORT`` of a running Ray cluster for the simulation engine to attach to (checked
        by :func:`simulations.ray_cluster.attach`); by default it starts a Ray instance of its
        own, stopped with the SuperLink.
    """
    with tempfile.TemporaryDirectory(prefix="fedadapt-flwr-") as home, guard() as mark:
        # Flower's Ray backend calls ray.init() without an address (its federation config has
        # none), so Ray reads RAY_ADDRESS; when that is unset it would attach to whatever
        # cluster `ray start` last started on this machine. "local" always starts a private
        # instance. A cluster attached to is only disconnected from (ray.shutdown()) when the
        # simulation process ends, never stopped; Ray ends the run's actors with it.
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": home, **mark,
               "RAY_ADDRESS": ray_address or "local"}
        # The SuperLink starts `flower-superexec` by name: put this environment's commands first.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        port = free_port()
        Path(home, "config.toml").write_text(
            '[superlink]\ndefault = "fedadapt-sim"\n\n[superlink.fedadapt-sim]\n'
            f'address = "127.0.0.1:{port}"\ninsecure = true\n',
            encoding="utf-8",
        )
        log_path = logs / "superlink.log"
        proc = spawn([flower_bin("flower-superlink"), "--insecure", "--simulation",
                      "--host", "127.0.0.1", "--port", str(port),
                      "--disable-runtime-dependency-installation"],
                     cwd=APP_DIR, env=env, log_path=log_path)
        try:
            wait_healthy(port, proc, STARTUP_TIMEOUT, log_path)
            log.info("simulation SuperLink on 127.0.0.1:%d (pid %d)", port, proc.pid)
            yield env, "fedadapt-sim"
        finally:
            stop_process(proc, "flower-superlink")


def app_variant(folder: Path, **components: str) -> Path:
    """A Flower app folder that runs other components with this project's settings.

    The folder holds only a ``pyproject.toml``: Flower then imports the components from the
    installed packages. Drills use it to run a misbehaving ClientApp beside the real ServerApp.
    """
    import tomllib

    import tomli_w

    project = tomllib.loads((APP_DIR / "pyproject.toml").read_text(encoding="utf-8"))
    flwr = project["tool"]["flwr"]
    app = {**flwr["app"], "components": {**flwr["app"]["components"], **components}}
    app.pop("fab-include", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(tomli_w.dumps({
        "build-system": project["build-system"],
        "project": {**project["project"], "name": "fedadapt-drill"},
        "tool": {"flwr": {"app": app}},
    }), encoding="utf-8")
    return folder


def run_app(
    run_config: dict[str, Any],
    num_sites: int,
    out: Path,
    *,
    on_event: EventHook | None = None,
    timeout: float = 3600.0,
    app_dir: Path = APP_DIR,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run the fedadapt app in Flower's simulation engine and return its report.

    Parameters
    ----------
    run_config : dict
        Run-config overrides (keys of ``[tool.flwr.app.config]``); ``out`` is set here.
    num_sites : int
        Number of simulated SuperNodes (one per site of the manifest).
    out : Path
        Output folder: the report, plots, progress events and logs go here.
    on_event : callable, optional
        Called with each progress event of the ServerApp.
    timeout : float
        Seconds after which the run is stopped and reported as failed.
    app_dir : Path
        The Flower app to run (this project; a drill passes one with a misbehaving ClientApp).
    ray_address : str, optional
        A running Ray cluster to run the virtual sites on (see :func:`simulation_superlink`).

    Returns
    -------
    dict
        The content of ``report.json``.

    Raises
    ------
    FlowerRunError
        If the SuperLink did not start (:class:`SimulationError`), or the run failed, timed
        out or wrote no report.
    """
    out = out.resolve()
    with simulation_superlink(out / "logs", ray_address=ray_address) as (env, connection):
        return submit_run(env, connection, run_config, out, on_event=on_event, timeout=timeout,
                          extra=simulation_options(num_sites), app_dir=app_dir)


def simulation_options(num_sites: int) -> list[str]:
    """``flwr run`` options of a simulated federation of ``num_sites`` SuperNodes.

    One CPU per ClientApp: Flower's default (two) runs the sites of a two-core machine one
    after another, so one slow site would hold up all the others.
    """
    return ["--federation-config", f"num-supernodes={num_sites}",
            "--federation-config", "client-resources-num-cpus=1"]
