"""``fedadapt deploy-local``: a real federation on this machine, over TLS with authenticated sites.

It does what the coordinator and each site engineer do (README, "Deployment"), with real
processes on loopback: certificates (``fedadapt certs``), one ``flower-superlink`` with TLS,
SuperNode authentication and its state on disk, reached directly only by the coordinator
(``flwr``, the ServerApp); the Fleet gateway (``server.gateway``) on a port of its own, the only
address the sites are given, which forwards the Fleet API and nothing else (no Control API);
registration of every site's public key, one ``flower-superexec``-backed ``flower-supernode``
per site (its own data file, key, folder and ``FLWR_HOME``) connected through the gateway, the
run (``flwr run``), the report; then it stops every process it started, also on Ctrl-C or
failure.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from client.site import Manifest
from deploy.process_guard import guard
from deploy.processes import (
    FLOWER_ENV,
    STARTUP_TIMEOUT,
    EventHook,
    FlowerRunError,
    flower_bin,
    free_port,
    kill_tree,
    spawn,
    stop_process,
    submit_run,
)
from server.certs import CertFiles, make_certs
from server.report import mark_incomplete, remove_report, write_report
from shared.errors import FedadaptError
from shared.files import create_private_file
from shared.settings import RunSettings

log = logging.getLogger(__name__)

CONNECTION = "fedadapt-local"


class DeploymentError(FedadaptError, RuntimeError):
    """A process of the deployment could not start or register; the message names its log."""


@dataclass
class Deployment:
    """The running federation: where its pieces are and how to reach them."""

    out: Path
    certs: CertFiles
    port: int
    env: dict[str, str]
    # The Fleet gateway's port: the sites' address (``port`` is the coordinator's only).
    gateway_port: int = 0
    # The address the gateway listens on and the sites are given (in the TLS certificate).
    site_host: str = "127.0.0.1"
    logs: dict[str, Path] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    registered: dict[str, int] = field(default_factory=dict)  # site name -> node id


# Flower's SuperExec checks for new work every second by default; every message of a round
# waits for that check at each site. Flower documents this variable for tuning it.
TASK_POLL_INTERVAL = "0.1"


def flower_env(home: Path) -> dict[str, str]:
    """Environment for Flower commands: private ``FLWR_HOME``, no phoning home, our PATH."""
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(home),
           "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": TASK_POLL_INTERVAL}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def wait_https(port: int, ca: Path, proc: subprocess.Popen[Any], log_path: Path,
               timeout: float = STARTUP_TIMEOUT, what: str = "the SuperLink",
               host: str = "127.0.0.1") -> None:
    """Wait until ``what`` answers ``GET /health`` on ``host`` over TLS, verified against ``ca``."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"{what} exited with code {proc.returncode}; "
                                  f"see {log_path}")
        try:
            with urllib.request.urlopen(f"https://{host}:{port}/health", context=context,
                                        timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise DeploymentError(f"{what} did not answer over TLS in {timeout:.0f} s; "
                          f"see {log_path}")


def _start(dep: Deployment, name: str, cmd: list[str], cwd: Path,
           env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
    log_path = dep.out / "logs" / f"{name}.log"
    cwd.mkdir(parents=True, exist_ok=True)
    proc = spawn(cmd, cwd=cwd, env=env or dep.env, log_path=log_path)
    dep.logs[name] = log_path
    dep.processes[name] = proc
    return proc


def start_superlink(dep: Deployment) -> None:
    """The coordinator's SuperLink: TLS, SuperNode authentication, state on disk (0600)."""
    folder = dep.out / "superlink"
    state = folder / "state.db"
    if not state.exists():
        # The state holds the sites' keys, runs and messages in transit: the SuperLink's own
        # umask would make it world-readable. SQLite keeps the mode of an existing (empty)
        # file, and gives its journal files the same.
        create_private_file(state, b"")
    proc = _start(dep, "superlink", [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(dep.certs.ca_cert),
        "--ssl-certfile", str(dep.certs.server_cert),
        "--ssl-keyfile", str(dep.certs.server_key),
        "--host", "127.0.0.1", "--port", str(dep.port),
        "--database", str(state),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ], folder)
    wait_https(dep.port, dep.certs.ca_cert, proc, dep.logs["superlink"])


def start_gateway(dep: Deployment) -> None:
    """The Fleet gateway in front of the SuperLink: the sites' only way in (Fleet API only).

    It serves TLS with the SuperLink's own certificate and verifies the SuperLink against the
    federation's CA; it is ready when ``GET /health`` answers through it.
    """
    proc = _start(dep, "gateway", [
        flower_bin("fedadapt"), "gateway",
        "--listen", f"{dep.site_host}:{dep.gateway_port}",
        "--superlink", f"127.0.0.1:{dep.port}",
        "--ca-cert", str(dep.certs.ca_cert),
        "--cert", str(dep.certs.server_cert),
        "--key", str(dep.certs.server_key),
    ], dep.out / "gateway")
    wait_https(dep.gateway_port, dep.certs.ca_cert, proc, dep.logs["gateway"],
               what="the Fleet gateway", host=dep.site_host)


def crash_superlink(dep: Deployment) -> None:
    """Kill the SuperLink and its ServerApp at once, as a power cut would (drills)."""
    kill_tree(dep.processes.get("superlink"))


def restart_superlink(dep: Deployment) -> None:
    """Start the SuperLink again on the same port, certificates and state database."""
    start_superlink(dep)


def register_site(dep: Deployment, name: str) -> None:
    """Register a site's public key at the SuperLink (``flwr supernode register``)."""
    public = dep.certs.site_keys[name][1]
    result = subprocess.run(
        [flower_bin("flwr"), "supernode", "register", str(public), CONNECTION, "--name", name,
         "--format", "json"],
        env=dep.env, capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0:
        raise DeploymentError(f"registering site {name} failed:\n{result.stdout[-2000:]}"
                              f"{result.stderr[-2000:]}")
    # Flower prints the node id once, here; the report's node_id of each site must match it.
    start = result.stdout.find("{")
    try:
        dep.registered[name] = int(json.loads(result.stdout[start:])["node-id"])
    except (ValueError, KeyError):  # Flower says why in its JSON (e.g. already registered)
        raise DeploymentError(f"registering site {name} failed: "
                              f"{result.stdout[start:][-2000:].strip()}") from None


def supernode_command(
    dep: Deployment, name: str, *, data_file: Path, site_dir: Path,
    site_features: list[str], private_key: Path | None = None, ca: Path | None = None,
    insecure: bool = False, auth: bool = True, extra: list[str] | None = None,
    policy: Path | None = None,
) -> list[str]:
    """The site engineer's ``flower-supernode`` command for one site (through the gateway).

    The site's folder is made as the README says (``fedadapt init-site``: keys, split secret,
    the deployment's default policy); ``policy`` names another policy file instead.
    """
    from client.site_setup import init_site

    made = init_site(site_dir, name)
    node_config = (
        f'data-file="{data_file}" site-dir="{made.site_dir}" site-name="{name}" '
        f'site-features="{",".join(site_features)}" policy="{policy or made.policy}"'
    )
    cmd = [flower_bin("flower-supernode"), "--superlink", f"{dep.site_host}:{dep.gateway_port}",
           "--port", str(free_port()), "--node-config", node_config]
    cmd += ["--insecure"] if insecure else ["--root-certificates", str(ca or dep.certs.ca_cert)]
    key = private_key if private_key is not None else dep.certs.site_keys[name][0]
    if auth:
        cmd += ["--auth-supernode-private-key", str(key)]
    return [*cmd, *(extra or [])]


def start_supernode(dep: Deployment, name: str, cmd: list[str], site_dir: Path) -> None:
    """Start a site's SuperNode with its own ``FLWR_HOME`` inside its private folder."""
    env = {**dep.env, "FLWR_HOME": str(site_dir / ".flwr")}
    _start(dep, name, cmd, site_dir, env)


def start_checked_supernode(dep: Deployment, name: str, cmd: list[str], site_dir: Path,
                            policy: Path) -> None:
    """A site that runs only the app bundles its policy approves.

    Its SuperNode runs with ``--isolation process`` and, beside it, the site's own executor
    (``fedadapt site-exec --policy``) on the SuperNode's runtime API (its ``--port``), which
    checks every bundle before any of it runs.
    """
    start_supernode(dep, name, [*cmd, "--isolation", "process"], site_dir)
    port = cmd[cmd.index("--port") + 1]
    env = {**dep.env, "FLWR_HOME": str(site_dir / ".flwr")}
    _start(dep, f"{name}-exec", [flower_bin("fedadapt"), "site-exec", "--policy", str(policy),
                                 "--runtime-api-address", f"127.0.0.1:{port}"], site_dir, env)


@contextmanager
def coordinator(out: Path, site_names: list[str], site_host: str = "127.0.0.1",
                gateway: bool = True) -> Iterator[Deployment]:
    """Certificates, a TLS SuperLink with authentication, ``flwr``'s connection, the gateway.

    The SuperLink is reached directly only by ``flwr`` and the ServerApp (on loopback); the
    sites get the Fleet gateway at ``site_host``:``gateway_port`` (an IP address of this
    machine, which the SuperLink's certificate then names too). Without ``gateway`` (the bare
    Flower baseline) the sites reach the SuperLink's own port. Every process started inside
    the block (also SuperNodes) is stopped on exit.
    """
    out.mkdir(parents=True, exist_ok=True)
    certs = make_certs(out / "certs", len(site_names), hosts=[site_host], names=site_names)
    home = out / "coordinator" / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{certs.ca_cert}"\n',
        encoding="utf-8",
    )
    gateway_port = free_port() if gateway else port
    while gateway and gateway_port == port:
        gateway_port = free_port()
    with guard() as mark:
        dep = Deployment(out=out, certs=certs, port=port, env={**flower_env(home), **mark},
                         gateway_port=gateway_port, site_host=site_host)
        try:
            start_superlink(dep)
            if gateway:
                start_gateway(dep)
            yield dep
        finally:
            for name, proc in reversed(list(dep.processes.items())):
                stop_process(proc, name)


def deploy_local(
    manifest: Manifest,
    out: Path,
    settings: RunSettings,
    *,
    data: str | None = None,
    on_event: EventHook | None = None,
    on_logs: Callable[[dict[str, Path]], None] | None = None,
    timeout: float = 3600.0,
    hook: Callable[[dict[str, Any], Deployment], None] | None = None,
    absent: tuple[str, ...] = (),
    site_policy: Path | None = None,
    site_exec: bool | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline over real processes with TLS and authenticated sites.

    Parameters
    ----------
    manifest : Manifest
        The sites, one SuperNode each (``simulations.datasets.sites_for_run`` makes it from
        ``--data``); their data files stay where the manifest names them.
    out : Path
        Output folder: certs, SuperLink state, each site's private folder, logs, report.
    settings : RunSettings
        Run settings (``expected-sites`` is set to the number of sites).
    data : str, optional
        What the sites were made from (``--data``), recorded in the report's config; by
        default the manifest's path.
    on_event : callable, optional
        Progress callback (the ServerApp's events).
    on_logs : callable, optional
        Called once with the log file of every process, when all have started.
    timeout : float
        Bound on the run, in seconds.
    hook : callable, optional
        Called with each progress event and the running deployment (drills kill processes).
    absent : tuple of str
        Sites whose SuperNode is not started (drills).
    site_policy : Path, optional
        Every site's policy (by default each has the one `fedadapt init-site` writes: the
        deployment's defaults, differential privacy required).
    site_exec : bool, optional
        Start every site with its own executor, which runs only the app bundles its policy
        approves (:func:`start_checked_supernode`); by default when ``site_policy`` is given.
        Otherwise each SuperNode starts Flower's executor itself.

    Returns
    -------
    dict
        The report (same contract as the simulation's, without the pooled reference), with
        ``deployment`` timings added: start-up, run and per-round latencies.
    """
    out = out.resolve()
    remove_report(out)  # an earlier run's report must not pass for this one's
    # A new deployment: an earlier run's SuperLink state (its registered keys, runs, messages)
    # would make registering the sites again fail.
    for old in (out / "superlink").glob("state.db*"):
        old.unlink()
    names = [s.name for s in manifest.sites]
    settings = replace(settings, schema=manifest.schema, expected_sites=len(names),
                       out=str(out))
    rounds: list[float] = []
    running: list[Deployment] = []

    def track(event: dict[str, Any]) -> None:
        if event.get("event") == "round":
            rounds.append(float(event["t"]))
        if on_event is not None:
            on_event(event)
        if hook is not None and running:
            hook(event, running[0])

    t0 = time.monotonic()
    with ExitStack() as stack:
        dep = stack.enter_context(coordinator(out, names))
        running.append(dep)
        for site in manifest.sites:
            register_site(dep, site.name)
        for site in manifest.sites:
            if site.name in absent:
                continue
            site_dir = out / "sites" / site.name
            cmd = supernode_command(
                dep, site.name, data_file=site.data_file, site_dir=site_dir,
                site_features=list(site.site_features),
                policy=site_policy.resolve() if site_policy is not None else None)
            if site_exec or (site_exec is None and site_policy is not None):
                start_checked_supernode(dep, site.name, cmd, site_dir,
                                        (site_policy or site_dir / "policy.toml").resolve())
            else:
                start_supernode(dep, site.name, cmd, site_dir)
        startup = time.monotonic() - t0
        if on_logs is not None:
            on_logs(dict(dep.logs))
        t1 = time.monotonic()
        try:
            report = submit_run(dep.env, CONNECTION, settings.to_run_config(), out,
                                on_event=track, timeout=timeout)
        except FlowerRunError as err:
            mark_incomplete(out)
            raise DeploymentError(f"{err}; process logs: "
                                  + ", ".join(str(p) for p in dep.logs.values())) from None
        except BaseException:
            mark_incomplete(out)
            raise
        run_seconds = time.monotonic() - t1
    mismatched = {name: entry.get("node_id") for name, entry in report["sites"].items()
                  if entry.get("node_id") is not None
                  and entry["node_id"] != dep.registered.get(name)}
    if mismatched:
        raise DeploymentError(f"sites answered under names registered for other keys: "
                              f"{mismatched} (registered: {dep.registered})")
    deltas = [b - a for a, b in itertools.pairwise(rounds)]
    report["deployment"] = {
        "startup_s": startup, "run_s": run_seconds, "total_s": time.monotonic() - t0,
        "round_latency_s": deltas,
        "mean_round_latency_s": sum(deltas) / len(deltas) if deltas else None,
        "tls": True, "supernode_auth": True, "fleet_gateway": True,
        "registered_nodes": dict(dep.registered),
        "logs": {k: str(v) for k, v in dep.logs.items()},
    }
    report["config"]["data"] = data if data is not None else str(manifest.path)
    write_report(report, out)
    return report
