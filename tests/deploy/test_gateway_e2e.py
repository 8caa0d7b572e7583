"""A real TLS SuperLink behind the Fleet gateway: sites train through it, but cannot control."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from deploy.local import (
    CONNECTION,
    Deployment,
    coordinator,
    register_site,
    start_supernode,
    submit_run,
    supernode_command,
)
from deploy.processes import APP_DIR, flower_bin
from shared.settings import RunSettings
from simulations.generator import generate

pytestmark = [pytest.mark.slow, pytest.mark.full, pytest.mark.timeout(300)]

SITE_CONNECTION = "site"
TRICKS = [
    "/v1/control/list-runs",
    "/v1/control/register-node",
    "/v1/fleet/../control/list-runs",
    "//v1/control/list-runs",
    "/v1/fleet/pull-messages/../../control/start-run",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/V1/CONTROL/list-runs",
    "/v1/runtime/pull-task-input",
    "/docs",
]


def _flwr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run a ``flwr`` command (bounded in time) and return its result."""
    return subprocess.run([flower_bin("flwr"), *args], env=env, cwd=APP_DIR,
                          capture_output=True, text=True, timeout=120, check=False)


def _direct(dep: Deployment, *args: str) -> Any:
    """A ``flwr ... --format json`` command of the coordinator, at the SuperLink itself."""
    result = _flwr(dep.env, *args, CONNECTION, "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def _post(port: int, ca: Path, path: str) -> int:
    """POST an empty protobuf body with the path bytes as given; the HTTP status."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                       context=ssl.create_default_context(cafile=str(ca)))
    try:
        conn.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def _tree(pid: int) -> list[psutil.Process]:
    """A running process and all its descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def test_sites_reach_the_fleet_api_through_the_gateway_and_nothing_else(
    tmp_path: Path, no_leftovers: None
) -> None:
    """A site trains through the gateway; with the site's CA it cannot register, list or run."""
    manifest = generate(tmp_path / "data", n_sites=2, seed=3)
    with coordinator(tmp_path / "run", ["hospital-a", "hospital-b"]) as dep:
        assert dep.gateway_port and dep.gateway_port != dep.port
        register_site(dep, "hospital-a")
        site = tmp_path / "run" / "sites" / "hospital-a"
        cmd = supernode_command(dep, "hospital-a", data_file=manifest.parent / "hospital-a.csv",
                                site_dir=site, site_features=["glucose"])
        assert cmd[cmd.index("--superlink") + 1] == f"127.0.0.1:{dep.gateway_port}"
        start_supernode(dep, "hospital-a", cmd, site)

        # (a) The SuperNode registered, activated and took part in a run, all through the gateway.
        settings = RunSettings(num_server_rounds=1, min_sites=1, node_wait_timeout=120.0,
                               dp="record")  # the site's default policy requires it
        report = submit_run(dep.env, CONNECTION, settings.to_run_config(), tmp_path / "run",
                            timeout=200)
        assert list(report["sites"]) == ["hospital-a"]
        assert report["sites"]["hospital-a"]["status"] == "withheld"  # its results: at the site
        nodes = _direct(dep, "supernode", "list")["nodes"]
        assert [n["status"] for n in nodes] == ["online"]
        runs = _direct(dep, "ls")["runs"]
        assert len(runs) == 1

        # (b) What a site holds (the CA certificate, the address it is given): no Control API.
        home = tmp_path / "site-home"
        home.mkdir()
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{SITE_CONNECTION}"\n\n[superlink.{SITE_CONNECTION}]\n'
            f'address = "127.0.0.1:{dep.gateway_port}"\n'
            f'root-certificates = "{dep.certs.ca_cert}"\n', encoding="utf-8")
        site_env = {**dep.env, "FLWR_HOME": str(home)}
        other_key = dep.certs.site_keys["hospital-b"][1]
        attempts = {
            "register": _flwr(site_env, "supernode", "register", str(other_key),
                              SITE_CONNECTION),
            "ls": _flwr(site_env, "ls", SITE_CONNECTION),
            "supernode list": _flwr(site_env, "supernode", "list", SITE_CONNECTION),
            "run": _flwr(site_env, "run", str(APP_DIR), SITE_CONNECTION),
        }
        for name, result in attempts.items():
            assert result.returncode != 0, f"flwr {name} through the gateway succeeded"
            assert "403 Forbidden" in result.stdout + result.stderr, name
        assert len(_direct(dep, "supernode", "list")["nodes"]) == 1  # nothing registered
        assert len(_direct(dep, "ls")["runs"]) == 1  # nothing submitted
        for path in TRICKS:
            assert _post(dep.gateway_port, dep.certs.ca_cert, path) == 403, path
        # The same raw Control API call is answered by the SuperLink's own port.
        assert _post(dep.port, dep.certs.ca_cert, "/v1/control/list-runs") == 200

        # (c) The same registration at the SuperLink itself works: the refusal is the gateway's.
        direct = _flwr(dep.env, "supernode", "register", str(other_key), CONNECTION)
        assert direct.returncode == 0, direct.stdout + direct.stderr
        assert len(_direct(dep, "supernode", "list")["nodes"]) == 2

        gateway_log = dep.logs["gateway"].read_text(encoding="utf-8")
        for path in ("/v1/control/register-node", "/v1/control/list-runs",
                     "/v1/control/list-nodes", "/v1/control/start-run"):
            assert f"refused POST '{path}'" in gateway_log, path
        key_body = other_key.read_text().split()[1]
        assert key_body not in gateway_log  # method and path only, never a body
        assert set(dep.processes) == {"superlink", "gateway", "hospital-a"}
        tree = [q for proc in dep.processes.values() for q in _tree(proc.pid)]
    # Everything this test started, and everything those started, is gone.
    left = [q.pid for q in tree if q.is_running() and q.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left running: {left}"
