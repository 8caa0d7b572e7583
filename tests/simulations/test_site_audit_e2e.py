"""A real simulation: each site's audit log says what the coordinator's replies.jsonl received."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array

from client.audit_log import read_audit

pytestmark = [pytest.mark.slow, pytest.mark.full, pytest.mark.timeout(300)]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _digest(values: list[float | None], dtype: str, shape: list[int]) -> str:
    """sha256 of an array's bytes as Flower carries them, rebuilt from the values received."""
    flat = np.asarray([np.nan if v is None else v for v in values], dtype=dtype)
    return hashlib.sha256(Array(flat.reshape(shape)).data).hexdigest()


def test_each_site_s_audit_reconciles_with_what_the_coordinator_received(
    tmp_path: Path, no_leftovers: None
) -> None:
    """Per site: the same replies (by message id), types, rounds, keys, values, shapes, bytes."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "fedadapt", "simulate", "--sites", "3", "--rounds", "2",
         "--record-replies", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "COLUMNS": "160"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    received = {e["reply_to"]: e for e in _lines(out / "replies.jsonl")}
    sites = sorted(p.name for p in (out / "sites").iterdir())
    assert sites == ["hospital-a", "hospital-b", "hospital-c"]
    report = json.loads((out / "report.json").read_text())
    matched = 0
    for name in sites:
        log = read_audit(out / "sites" / name)
        assert not log.unreadable
        # stats, two training rounds, the glucose group's rounds at its members (a and c),
        # adapt, evaluate; each answered once, all ok.
        group = report["groups"]["glucose"]
        extra = int(group["rounds"]) if name in group["members"] else 0
        assert [e["phase"] for e in log.entries] == [
            "stats", "train", "train", *["train"] * extra, "adapt", "evaluate"], name
        assert [e["round"] for e in log.entries] == [
            None, 1, 2, *range(1, extra + 1), None, None]
        assert len({e["node"] for e in log.entries}) == 1 and len(
            {e["run"] for e in log.entries}) == 1
        for sent in log.entries:
            got = received[sent["reply_to"]]  # the coordinator received this very reply
            assert sent["status"] == "ok" and "error" not in got
            assert got["node"] == sent["node"] and got["type"] == sent["type"]
            assert got.get("round") == sent["round"]
            assert got["bytes"] == sent["bytes"], (name, sent["phase"])
            assert got["metrics"] == sent["metrics"]  # keys and values (record-replies)
            assert got["configs"] == sent["configs"]
            assert got["configs"].get("site", {}).get("site-name", name) == name
            assert got["arrays"].keys() == sent["arrays"].keys()
            for record, arrays in sent["arrays"].items():
                assert arrays.keys() == got["arrays"][record].keys()
                for key, a in arrays.items():
                    g = got["arrays"][record][key]
                    assert (g["shape"], g["bytes"]) == (a["shape"], a["bytes"])
                    assert _digest(g["values"], a["dtype"], a["shape"]) == a["sha256"]
            matched += 1
        assert sum(t["bytes"] for t in log.totals().values()) == sum(
            received[e["reply_to"]]["bytes"] for e in log.entries)
    # Nothing reached the coordinator that a site's audit does not list.
    # 15 replies of the five phases, and the group's rounds at its two members.
    assert matched == len(received) == 15 + 2 * int(report["groups"]["glucose"]["rounds"])
