"""``fedadapt status``: a run's status from its folder, and the read-only page that serves it."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.status import run_status
from server.status_page import run_page
from simulations.generator import generate
from simulations.inprocess import run_app_in_process


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole in-process run of three generated hospitals, two rounds."""
    tmp = tmp_path_factory.mktemp("status")
    manifest = generate(tmp / "data", n_sites=3, seed=3)
    run_app_in_process({"sites-manifest": str(manifest), "num-server-rounds": 2,
                        "strategy": "fedavg", "cv-folds": 2}, 3, tmp / "out")
    return tmp / "out"


def test_a_finished_runs_status_names_its_sites_rounds_and_report(finished: Path) -> None:
    """State, phase, the rounds' losses, each site by name with its replies; the report."""
    s = run_status(finished, now=0.0)
    assert (s["state"], s["phase"], s["round"], s["rounds"]) == ("finished", "finished", 2, 2)
    assert [p["round"] for p in s["losses"]] == [1, 2]
    assert sorted(s["sites"]) == ["hospital-a", "hospital-b", "hospital-c"]
    site = s["sites"]["hospital-a"]
    assert site["replies"] >= 5 and site["bytes"] > 0 and site["errors"] == 0
    assert site["phase"] == "evaluate" and isinstance(site["node"], int)
    assert sorted(r["site"] for r in s["report"]["sites"]) == sorted(s["sites"])


def test_a_live_run_reads_as_running_and_a_refusal_names_its_rule(tmp_path: Path) -> None:
    """Mid-run files: running, the round so far; an error reply counted, its rule named."""
    (tmp_path / "events.jsonl").write_text(
        '{"event": "phase", "phase": "train"}\n'
        '{"event": "round", "round": 1, "rounds": 5, "loss": 0.6, "epsilon": {"north": 0.7}}\n'
        '{"event": "sites-named", "names": {"7": "north"}}\n{"event": "round", "rou')
    (tmp_path / "replies.jsonl").write_text(json.dumps(
        {"node": 7, "type": "train", "round": 1, "time": 100.0, "bytes": 900}) + "\n" +
        json.dumps({"node": 7, "type": "train", "round": 2, "time": 110.0,
                    "error": "[site north] refused by policy rule 'max-rounds': no more"})
        + "\n")
    s = run_status(tmp_path, now=112.0)
    assert (s["state"], s["phase"], s["round"]) == ("running", "train", 1)
    north = s["sites"]["north"]
    assert north["refusals"] == ["max-rounds"] and north["errors"] == 1
    assert north["last_seen_s"] == 2.0 and north["epsilon"] == 0.7 and north["round"] == 2
    assert s["report"] is None


def test_the_page_serves_its_three_paths_and_nothing_else(finished: Path) -> None:
    """/ (the page), /status.json, /plots/NAME.png; any other path, 404."""
    server = run_page(finished)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        assert "fedadapt" in page and "status.json" in page
        status = json.loads(urllib.request.urlopen(base + "/status.json", timeout=10).read())
        assert status["state"] == "finished"
        png = urllib.request.urlopen(base + "/plots/metrics.png", timeout=10).read()
        assert png.startswith(b"\x89PNG")
        for path in ("/plots/../report.json", "/report.json", "/plots/x.txt", "/etc/passwd"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert server.server_address[0] == "127.0.0.1"
