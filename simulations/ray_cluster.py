"""Attaching a simulation to a running multi-node Ray cluster, checked before anything starts.

Flower 1.42's simulation engine (``flwr/server/superlink/fleet/vce/backend/raybackend.py``)
calls ``ray.init(runtime_env=..., include_dashboard=False, **init_args)`` in the simulation
process, and only the ``init_args`` its federation config knows (``num_cpus``, ``num_gpus``,
``logging_level``, ``log_to_driver``; ``flwr/simulation/app.py``) can be passed: there is no
Ray address among them. ``ray.init`` without an address reads ``RAY_ADDRESS`` from the
environment, so that variable, given to the SuperLink and inherited by the simulation process,
is how a run attaches to a cluster (:func:`simulations.superlink.simulation_superlink`).

Ray itself would wait for minutes on an address where no cluster answers; :func:`attach`
therefore checks the address first, in a separate short-lived process (a Ray driver that only
connects, starts nothing and disconnects), and returns the cluster's exact address, its nodes
and CPUs, or a one-line reason.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from deploy.process_guard import die_with_parent
from simulations.superlink import SimulationError

PROBE_TIMEOUT = 60.0
CONNECT_TIMEOUT = 5.0
CLIENT_CPUS = 1  # each virtual site's ClientApp gets one CPU (superlink.run_app)
MARKER = "fedadapt-ray-cluster: "


class RayClusterError(SimulationError):
    """The Ray cluster named cannot be used; the message says why and what to check."""


@dataclass(frozen=True)
class RayCluster:
    """A running Ray cluster the simulation attaches to (fedadapt never stops it)."""

    address: str
    nodes: int
    cpus: float

    def as_dict(self) -> dict[str, Any]:
        """The cluster as ``report.json`` records it (``config.ray-cluster``)."""
        return {"address": self.address, "nodes": self.nodes, "cpus": self.cpus}


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` of a Ray head as host and port.

    Raises
    ------
    RayClusterError
        If ``address`` is not of that form.
    """
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayClusterError(
            f"--ray-address {address!r}: give the head node's HOST:PORT (the port of "
            "`ray start --head --port`, 6379 by default)")
    return host.strip("[]"), int(port)


def attach(address: str, timeout: float = PROBE_TIMEOUT) -> RayCluster:
    """Check that a Ray cluster runs at ``address`` and that this machine can use it.

    Parameters
    ----------
    address : str
        The head node's ``HOST:PORT`` (its GCS port). Ray's ``auto`` is refused: when this
        machine has no address recorded by ``ray start`` it picks any Ray instance running
        here, such as another user's private one.
    timeout : float
        Bound on the check, in seconds.

    Returns
    -------
    RayCluster
        With the address as Ray resolved it (the head's IP for a host name).

    Raises
    ------
    RayClusterError
        If nothing answers there, it is not a Ray cluster this machine belongs to, the
        versions differ, or no node has a CPU for a virtual site.
    """
    address = address.strip()
    if "://" in address:
        raise RayClusterError(
            f"--ray-address {address}: Ray Client addresses are not supported; run fedadapt "
            "on a node of the cluster and give the head's HOST:PORT")
    if address == "auto":
        raise RayClusterError(
            "--ray-address auto: give the head node's HOST:PORT (Ray's 'auto' may pick any Ray "
            "instance running on this machine, also another user's)")
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT):
            pass
    except socket.gaierror as err:
        raise RayClusterError(f"no Ray cluster at {address}: host {host!r} not found "
                              f"({err.strerror})") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise RayClusterError(
            f"no Ray cluster at {address}: nothing answers on port {port} ({reason}); "
            f"start one with `ray start --head --port {port}` or check the address"
        ) from None
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "simulations.ray_cluster", address],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
        )
    except subprocess.TimeoutExpired:
        raise RayClusterError(
            f"the Ray cluster at {address} did not answer within {timeout:.0f} s: is it the "
            "head's GCS port, and is this machine a node of the cluster (`ray start "
            "--address HEAD:PORT`)?") from None
    found = [line[len(MARKER):] for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if not found:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RayClusterError(f"could not attach to the Ray cluster at {address}: {last}")
    info = json.loads(found[-1])
    if "error" in info:
        raise RayClusterError(f"could not attach to the Ray cluster at {address}: "
                              f"{info['error']}")
    if info["max_node_cpus"] < CLIENT_CPUS:
        raise RayClusterError(
            f"the Ray cluster at {address} has no node with {CLIENT_CPUS} CPU for a virtual "
            "site (start its nodes with `ray start ... --num-cpus N`, N >= 1)")
    return RayCluster(address=info["address"], nodes=int(info["nodes"]),
                      cpus=float(info["cpus"]))


def probe(address: str) -> dict[str, Any]:
    """Connect to the cluster as a Ray driver, describe it, disconnect (the probe process).

    Returns
    -------
    dict
        ``address`` (``HOST:PORT``), ``nodes`` (alive), ``cpus`` (in total) and
        ``max_node_cpus``; or ``error`` (one line).
    """
    import ray

    try:
        # Connecting only: a driver starts no Ray process of its own on an existing cluster.
        ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR,
                 log_to_driver=False)
    except Exception as err:
        text = " ".join(str(err).split()) or type(err).__name__
        return {"error": text}
    try:
        alive = [n for n in ray.nodes() if n.get("Alive")]
        cpus = [float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive]
        return {"address": ray.get_runtime_context().gcs_address, "nodes": len(alive),
                "cpus": sum(cpus), "max_node_cpus": max(cpus, default=0.0)}
    finally:
        ray.shutdown()


def main() -> None:
    """Entry point of the probe (``python -m simulations.ray_cluster ADDRESS``)."""
    print(MARKER + json.dumps(probe(sys.argv[1])), flush=True)


if __name__ == "__main__":
    main()
