"""`fedadapt audit --site-dir DIR`: a site's audit log as a table of 100 columns, or JSON."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from typer.testing import CliRunner

from client.audit_log import AUDIT_FILE, audited
from client.egress import build_reply, error_reply
from client.site import SiteConfigError, SiteSettings
from fedadapt.cli import app
from shared import protocol
from shared.schema import load_schema
from shared.wire import wire_bytes


def _site_with_two_replies(tmp_path: Path) -> tuple[Path, int]:
    """A site folder whose audit log holds a stats reply and an error reply of run 7."""
    site = SiteSettings("s", tmp_path / "s.csv", (), tmp_path / "site")
    msg = Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=1,
                  message_type=protocol.STATS)
    ok = build_reply(msg, shared_features=load_schema("synthetic").shared_features,
                     metrics={"rows": [3.0], "num-examples": 3.0})
    failed = error_reply(msg, SiteConfigError("no data-file set"), "stats")
    for reply in (ok, failed):
        assert audited(msg, reply, "stats", site) is reply
    return site.site_dir, wire_bytes(ok) + wire_bytes(failed)


def test_the_table_shows_each_reply_and_the_bytes_per_run(
    tmp_path: Path, task_identity: None
) -> None:
    """Phase, keys, arrays, bytes and status per reply; the run's total; within 100 columns."""
    site_dir, total = _site_with_two_replies(tmp_path)
    result = CliRunner().invoke(app, ["audit", "--site-dir", str(site_dir)],
                                env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = [line for line in lines if " stats " in line]
    assert len(rows) == 2
    assert "ok" in rows[0] and f"error {protocol.SITE_ERROR}" in rows[1]
    assert f"run 7: 2 replies, {total:,} bytes sent, 1 of them errors or refusals" in \
        result.output


def test_json_output_and_a_folder_without_a_log(tmp_path: Path, task_identity: None) -> None:
    """--json gives the entries and totals; a folder without audit.jsonl is one error line."""
    site_dir, total = _site_with_two_replies(tmp_path)
    result = CliRunner().invoke(app, ["audit", "--site-dir", str(site_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["totals"] == {"7": {"replies": 2, "bytes": total, "errors": 1}}
    assert [e["status"] for e in doc["entries"]] == ["ok", "error"]
    missing = CliRunner().invoke(app, ["audit", "--site-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
    assert f"{tmp_path / 'nowhere' / AUDIT_FILE} not found" in missing.output
