"""A site's status page: its audit log's verdict, what it sent, its ledger, its policy."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

from client.audit_log import audit_path
from client.site_status import site_page, site_status
from drills.curious import base_config, deployed_site
from shared.schema import load_schema
from simulations.generator import generate


def test_a_sites_page_shows_its_audit_verdict_sends_policy_and_a_broken_chain(
        tmp_path: Path, task_identity: None) -> None:
    """Two stats replies audited: chain intact, one run; an edited line: chain broken."""
    manifest = generate(tmp_path / "data", n_sites=1, seed=2)
    site = deployed_site(tmp_path / "site", manifest.parent / "hospital-a.csv",
                         "require-dp = false")
    config = base_config(load_schema("synthetic"))
    for _ in range(2):
        assert not site.ask("stats", config).has_error()
    s = site_status(site.site_dir)
    assert s["chain"]["ok"] and s["chain"]["entries"] >= 2
    assert sum(r["replies"] for r in s["runs"].values()) == 2
    assert s["recent"][0]["phase"] == "stats" and s["ledger"]["error"] is None
    assert any("differential privacy" in line for line in s["policy"])
    server = site_page(site.site_dir)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/status.json"
        served = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert served["chain"]["ok"] is True
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    log = audit_path(site.site_dir)
    lines = log.read_text(encoding="utf-8").splitlines()
    first = next(i for i, line in enumerate(lines) if '"stats"' in line)
    lines[first] = lines[first].replace('"stats"', '"train"', 1)
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    broken = site_status(site.site_dir)["chain"]
    assert not broken["ok"] and broken["line"] is not None
