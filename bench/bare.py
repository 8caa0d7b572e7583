"""Flower's floor: the bare Flower app (``bench/bare_app``), run as fedadapt runs.

The bare app does the kind of work of fedadapt's source-model training and nothing else:
Message API FedAvg over every node, no federated evaluation, a logistic regression of
``n_inputs + 1`` weights, a few full-batch gradient steps per node on random rows made from
its node id. What it costs is what any Flower app of this shape costs on this machine.

:func:`run_bare_simulation` starts it exactly as ``fedadapt simulate`` starts fedadapt (a
private ``flower-superlink --simulation``, ``flwr run --stream`` with the same
``--federation-config`` options, the same process guard); :func:`run_bare_deployed` as
``fedadapt deploy-local`` does (certificates, a TLS SuperLink with SuperNode authentication
and its state on disk, each node's key registered, one SuperNode per node with its own
``FLWR_HOME``); by default without fedadapt's Fleet gateway, the nodes connecting to the
SuperLink directly. Both stop every process they started, also on failure or Ctrl-C.

Alone: ``fedadapt bench --parts bare`` (``--bare-deployed`` for the deployed one; the other
``--bare-*`` options set nodes, rounds, inputs, rows, polling and the gateway).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.memory import PeakRss
from bench.options import BARE_ROWS
from deploy.local import (
    CONNECTION,
    coordinator,
    register_site,
    start_supernode,
    supernode_command,
)
from deploy.processes import FlowerRunError, start_run, stop_process
from simulations.superlink import simulation_options, simulation_superlink

log = logging.getLogger(__name__)

BARE_APP_DIR = Path(__file__).resolve().parent / "bare_app"
RESULT_FILE = "bare-result.json"  # written by the bare ServerApp into the run's ``out``


def bare_run_config(
    rounds: int, n_inputs: int, *, expected_nodes: int, rows: int = BARE_ROWS,
    poll_interval: float = 0.0, node_wait_timeout: float = 120.0,
) -> dict[str, Any]:
    """Run-config overrides of the bare app (keys of its ``[tool.flwr.app.config]``).

    Parameters
    ----------
    rounds : int
        Federated rounds.
    n_inputs : int
        Model inputs (the model has ``n_inputs + 1`` weights).
    expected_nodes : int
        Nodes the ServerApp waits for before round 1 (and trains on every round).
    rows : int
        Random rows per node.
    poll_interval : float
        0: Flower's own ``send_and_receive`` (a pull every 3 s when deployed); > 0: the
        ServerApp pulls replies every ``poll_interval`` s, up to 0.5 s, as fedadapt's does.
    node_wait_timeout : float
        Seconds the ServerApp waits for ``expected_nodes``.

    Returns
    -------
    dict
        The overrides (``out`` is set by :func:`deploy.processes.start_run`).
    """
    if rounds < 1 or n_inputs < 1 or rows < 1 or expected_nodes < 1:
        raise ValueError("rounds, n_inputs, rows and the number of nodes must be positive")
    return {"num-server-rounds": rounds, "n-inputs": n_inputs, "rows": rows,
            "expected-nodes": expected_nodes, "poll-interval": float(poll_interval),
            "node-wait-timeout": float(node_wait_timeout)}


def _wait_run(proc: subprocess.Popen[Any], timeout: float, workdir: Path,
              run_log: Path) -> None:
    """Wait for ``flwr run --stream`` to exit; raise with the rounds done if it takes too long."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        done = len(read_result(workdir).get("rounds", []))
        raise FlowerRunError(f"the bare run took longer than {timeout:.0f} s ({done} rounds "
                             f"done); see {run_log}") from None


def read_result(workdir: Path) -> dict[str, Any]:
    """What the bare ServerApp wrote so far (it rewrites the file after every round)."""
    path = workdir / RESULT_FILE
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")))


def _run_bare(env: dict[str, str], connection: str, config: dict[str, Any], workdir: Path,
              timeout: float, extra: list[str] | None = None) -> Path:
    """Submit the bare app with ``flwr run``, follow it to its end, stop it; its log's path."""
    proc, run_log = start_run(env, connection, config, workdir, extra=extra,
                              app_dir=BARE_APP_DIR)
    try:
        _wait_run(proc, timeout, workdir, run_log)
    finally:
        stop_process(proc, "flwr run")
    return run_log


def _summary(mode: str, n_nodes: int, rounds: int, n_inputs: int, rows: int,
             result: dict[str, Any], timings: dict[str, float], peak: PeakRss,
             run_log: Path) -> dict[str, Any]:
    """The returned measurement; raise if the ServerApp did not finish every round."""
    if not result.get("finished"):
        done = len(result.get("rounds", []))
        raise FlowerRunError(f"the bare run ended after {done} of {rounds} rounds; see "
                             f"{run_log} and the SuperLink's log beside it")
    per_round = [float(r["seconds"]) for r in result["rounds"]]
    short = [r["round"] for r in result["rounds"] if r["replies"] - r["errors"] < n_nodes]
    if short:
        raise FlowerRunError(f"rounds {short} had fewer than {n_nodes} good replies; see "
                             f"{run_log}")
    import flwr

    return {
        "mode": mode, "nodes": n_nodes, "rounds": rounds, "n_inputs": n_inputs, "rows": rows,
        "poll_interval": result.get("poll_interval", 0.0),
        **timings,
        "serverapp_s": result["serverapp_seconds"], "train_s": result["train_seconds"],
        "round_s": per_round,
        "round_median_s": statistics.median(per_round),
        "round_mean_s": statistics.fmean(per_round),
        # Round 1 also pays for starting ray and its ClientApp actors (simulation) or the
        # first ClientApp processes (deployed); the later rounds are the steady cost.
        "first_round_s": per_round[0],
        "later_round_median_s": statistics.median(per_round[1:]) if rounds > 1 else None,
        "final_train_loss": result["rounds"][-1]["train_loss"],
        **peak.as_dict(),
        "rss_scope": "every process started for the run (not the calling process)",
        "flwr_version": flwr.__version__,
        "run_log": str(run_log),
    }


def run_bare_simulation(
    n_nodes: int, rounds: int, n_inputs: int, workdir: Path, *, rows: int = BARE_ROWS,
    poll_interval: float = 0.0, timeout: float = 3600.0,
) -> dict[str, Any]:
    """Run the bare app in Flower's simulation engine, as ``fedadapt simulate`` runs fedadapt.

    Parameters
    ----------
    n_nodes : int
        Simulated SuperNodes (``--federation-config num-supernodes=N``).
    rounds : int
        Federated rounds.
    n_inputs : int
        Model inputs (``n_inputs + 1`` weights).
    workdir : Path
        Output folder: ``bare-result.json`` and ``logs/`` (``superlink.log``, ``flwr-run.log``).
    rows : int
        Random rows per node.
    poll_interval : float
        See :func:`bare_run_config` (in simulation Flower's grid already pulls every 0.1 s).
    timeout : float
        Seconds after which the run is stopped and reported as failed.

    Returns
    -------
    dict
        ``wall_s`` (SuperLink start to every process stopped), ``startup_s`` (SuperLink
        healthy), ``run_s`` (``flwr run`` submitted to exited), ``stop_s`` (stopping every
        process), ``serverapp_s``, ``train_s``
        (the strategy's rounds), ``round_s`` (each round: sampling to aggregated model),
        ``round_median_s``, ``round_mean_s``, ``first_round_s`` (with ray's start-up),
        ``later_round_median_s`` (rounds 2 on), ``peak_rss_gib`` and ``peak_processes`` (every
        process started for the run, sampled every 0.2 s), the settings, ``run_log``.

    Raises
    ------
    FlowerRunError
        If the run failed, timed out or a round lacked replies; the message names the logs.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RESULT_FILE).unlink(missing_ok=True)
    config = bare_run_config(rounds, n_inputs, expected_nodes=n_nodes, rows=rows,
                             poll_interval=poll_interval)
    t0 = time.monotonic()
    with (PeakRss(include_root=False) as peak,
          simulation_superlink(workdir / "logs") as (env, connection)):
        t1 = time.monotonic()
        run_log = _run_bare(env, connection, config, workdir, timeout,
                            extra=simulation_options(n_nodes))
        t2 = time.monotonic()
    t3 = time.monotonic()
    timings = {"wall_s": t3 - t0, "startup_s": t1 - t0, "run_s": t2 - t1, "stop_s": t3 - t2}
    return _summary("simulation", n_nodes, rounds, n_inputs, rows, read_result(workdir),
                    timings, peak, run_log)


def run_bare_deployed(
    n_nodes: int, rounds: int, n_inputs: int, workdir: Path, *, rows: int = BARE_ROWS,
    poll_interval: float = 0.0, gateway: bool = False, timeout: float = 3600.0,
) -> dict[str, Any]:
    """Run the bare app on a TLS SuperLink and ``n_nodes`` authenticated SuperNodes.

    Started with ``deploy.local``'s helpers, as ``fedadapt deploy-local`` starts
    fedadapt: certificates, ``flower-superlink`` with TLS, ``--enable-supernode-auth`` and its
    state on disk, every node's public key registered with ``flwr supernode register``, one
    ``flower-supernode`` per node (TLS, its private key, its own ``FLWR_HOME``; fedadapt's
    SuperExec poll interval of 0.1 s), ``flwr run --stream``. Everything is stopped afterwards.

    Parameters
    ----------
    n_nodes : int
        SuperNodes to start (each registers a key, so start-up grows with ``n_nodes``).
    rounds, n_inputs : int
        Federated rounds; model inputs.
    workdir : Path
        Output folder: certificates, SuperLink state, node folders, ``logs/``, the result.
    rows : int
        Random rows per node.
    poll_interval : float
        See :func:`bare_run_config`: 0 keeps Flower's 3 s between the ServerApp's pulls.
    gateway : bool
        Put fedadapt's Fleet gateway between the nodes and the SuperLink (as deploy-local
        does); the default measures Flower alone.
    timeout : float
        Bound on the run (after start-up), in seconds.

    Returns
    -------
    dict
        As :func:`run_bare_simulation`, plus ``startup_s`` covering certificates, SuperLink,
        registrations and SuperNodes, and ``tls``, ``supernode_auth``, ``fleet_gateway``.
    """
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RESULT_FILE).unlink(missing_ok=True)
    config = bare_run_config(rounds, n_inputs, expected_nodes=n_nodes, rows=rows,
                             poll_interval=poll_interval)
    names = [f"node-{i}" for i in range(1, n_nodes + 1)]
    t0 = time.monotonic()
    with PeakRss(include_root=False) as peak:
        running = coordinator(workdir, names, gateway=gateway)
        with running as dep:
            for name in names:
                register_site(dep, name)
            for name in names:
                node_dir = workdir / "nodes" / name
                # The bare ClientApp reads no node config; deploy's command is reused as is.
                start_supernode(dep, name, supernode_command(
                    dep, name, data_file=Path(os.devnull), site_dir=node_dir, site_features=[],
                ), node_dir)
            t1 = time.monotonic()
            run_log = _run_bare(dep.env, CONNECTION, config, workdir, timeout)
            t2 = time.monotonic()
    t3 = time.monotonic()
    timings = {"wall_s": t3 - t0, "startup_s": t1 - t0, "run_s": t2 - t1, "stop_s": t3 - t2}
    summary = _summary("deployed", n_nodes, rounds, n_inputs, rows, read_result(workdir),
                       timings, peak, run_log)
    return {**summary, "tls": True, "supernode_auth": True, "fleet_gateway": gateway}
