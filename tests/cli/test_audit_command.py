"""`fedadapt audit --site-dir DIR`: a site's audit log as a table of 100 columns, or JSON."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from typer.testing import CliRunner

from client.audit_log import AUDIT_FILE, PREV_MISMATCH, audited, record_event, verify_chain
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
    assert f"head sha256 {verify_chain(site_dir).head}\n" in result.output
    assert "warning" not in result.output


def test_json_output_and_a_folder_without_a_log(tmp_path: Path, task_identity: None) -> None:
    """--json gives the entries and totals; a folder without audit.jsonl is one error line."""
    site_dir, total = _site_with_two_replies(tmp_path)
    result = CliRunner().invoke(app, ["audit", "--site-dir", str(site_dir), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["totals"] == {"7": {"replies": 2, "bytes": total, "errors": 1}}
    assert [e["status"] for e in doc["entries"]] == ["ok", "error"]
    head = verify_chain(site_dir).head
    assert doc["head"] == head and doc["entries"][1]["prev"] != head
    assert doc["chain"] | {"path": ""} == {
        "path": "", "entries": 2, "head": head, "ok": True, "line": None, "reason": None,
        "kept_head": None, "kept_head_found": None, "kept_head_line": None}
    missing = CliRunner().invoke(app, ["audit", "--site-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1
    assert f"{tmp_path / 'nowhere' / AUDIT_FILE} not found" in missing.output


def _audit(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, ["audit", *args], env={"COLUMNS": "100"})
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output.splitlines()


def test_verify_says_the_chain_is_intact_and_its_head(
    tmp_path: Path, task_identity: None
) -> None:
    site_dir, _ = _site_with_two_replies(tmp_path)
    head = verify_chain(site_dir).head
    code, lines = _audit("--site-dir", str(site_dir), "--verify")
    assert (code, lines) == (0, [f"audit log {site_dir / AUDIT_FILE}: 2 entries, chain intact; "
                                 f"head sha256 {head}"])


def test_verify_names_the_first_broken_entry_and_exits_1(
    tmp_path: Path, task_identity: None
) -> None:
    """The first reply's bytes edited: line 2 no longer names line 1; the table warns first."""
    site_dir, _ = _site_with_two_replies(tmp_path)
    path = site_dir / AUDIT_FILE
    first, rest = path.read_bytes().split(b"\n", 1)
    entry = json.loads(first)
    path.write_bytes(first.replace(f'"bytes":{entry["bytes"]}'.encode(),
                                   f'"bytes":{entry["bytes"] - 1}'.encode()) + b"\n" + rest)
    code, lines = _audit("--site-dir", str(site_dir), "--verify")
    assert (code, lines) == (1, [f"{path}:2: audit chain broken: {PREV_MISMATCH}"])
    code, lines = _audit("--site-dir", str(site_dir))
    assert code == 0
    assert lines[0] == f"warning: {path}:2: audit chain broken: {PREV_MISMATCH}"
    assert lines[1].strip() == str(path)  # then the table, its title first
    code, lines = _audit("--site-dir", str(site_dir), "--json", "--verify")
    assert code == 1 and json.loads(lines[0])["chain"]["line"] == 2


def test_a_kept_head_is_found_until_entries_are_removed(
    tmp_path: Path, task_identity: None
) -> None:
    """Kept after two entries, found after a third; gone once the log is cut back to one."""
    site_dir, _ = _site_with_two_replies(tmp_path)
    path = site_dir / AUDIT_FILE
    kept = verify_chain(site_dir).head
    record_event(site_dir, "privacy-ledger-reset", run=7)
    code, lines = _audit("--site-dir", str(site_dir), "--head", kept)
    assert code == 0 and len(lines) == 1
    assert lines[0].endswith(f"3 entries, chain intact; head sha256 {verify_chain(path).head}; "
                             "kept head found at line 2")
    path.write_bytes(path.read_bytes().split(b"\n", 1)[0] + b"\n")
    code, lines = _audit("--site-dir", str(site_dir), "--verify", "--head", kept)
    assert (code, lines) == (1, [f"audit log {path}: the kept head {kept} is not in the log: "
                                 "entries were removed or rewritten"])
    code, lines = _audit("--site-dir", str(site_dir), "--head", "abc")
    assert code == 1 and lines == ["error: --head abc: not a sha256 hash (64 hexadecimal digits)"]


def test_an_event_is_a_row_of_the_table_not_a_reply(tmp_path: Path, task_identity: None) -> None:
    site_dir, total = _site_with_two_replies(tmp_path)
    record_event(site_dir, "privacy-ledger-reset", run=7)
    code, lines = _audit("--site-dir", str(site_dir))
    assert code == 0 and max(len(line) for line in lines) <= 100
    (row,) = [line for line in lines if "privacy-" in line]  # the name wraps at its hyphens
    assert row.split("│")[-2].strip() == "event"
    phase = [line.split("│")[3].strip() for line in lines[lines.index(row):][:3]]
    assert "".join(phase) == "privacy-ledger-reset"
    assert f"run 7: 2 replies, {total:,} bytes sent, 1 of them errors or refusals" in lines
