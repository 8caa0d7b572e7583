"""Every reply a site sends is in its own audit log first; what cannot be recorded is not sent."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import audit_log
from client.audit_log import AUDIT_FILE, audited, read_audit
from client.correction_store import load_correction
from client.source_model_store import load_source_model
from shared import newton, protocol
from shared.wire import wire_bytes
from tests.client.test_egress import (
    CANARY_GLUCOSE,
    CANARY_TEXT,
    CANARY_WEIGHT,
    _base,
    _context,
    _run_phases,
    _send,
    _site_file,
)


def _entries(site_dir: Path) -> list[dict[str, Any]]:
    log = read_audit(site_dir)
    assert not log.unreadable
    return log.entries


def _numbers(value: Any) -> list[float]:
    """Every number anywhere in a JSON value."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)]
    return []


def _assert_matches(entry: dict[str, Any], reply: Message) -> None:
    """An entry says exactly what its reply carries: keys, values, shapes, digests, size."""
    assert entry["bytes"] == wire_bytes(reply)
    assert entry["run"] == reply.metadata.run_id
    assert entry["reply_to"] == reply.metadata.reply_to_message_id
    if reply.has_error():
        assert entry["error"] == {"code": reply.error.code, "reason": reply.error.reason}
        assert "metrics" not in entry and "arrays" not in entry
        return
    content = reply.content
    assert entry["metrics"] == {
        n: json.loads(json.dumps({k: audit_log._number(v) for k, v in r.items()}))
        for n, r in content.metric_records.items()}
    assert entry["configs"] == {n: {k: str(v) for k, v in r.items()}
                                for n, r in content.config_records.items()}
    assert entry["arrays"] == {
        n: {k: {"shape": list(r[k].shape), "dtype": r[k].dtype, "bytes": len(r[k].data),
                "sha256": hashlib.sha256(r[k].data).hexdigest()} for k in r}
        for n, r in content.array_records.items()}


def test_every_reply_through_the_client_app_is_audited_before_it_is_returned(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Five replies (stats, train, Newton, adapt, evaluate): five entries, each fsynced first."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        proc = Path(f"/proc/self/fd/{fd}")
        synced.append(str(proc.readlink()) if proc.is_symlink() else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(audit_log.os, "fsync", fsync)
    replies, site_dir = _run_phases(tmp_path)
    entries = _entries(site_dir)
    assert [e["phase"] for e in entries] == ["stats", "train", "train", "adapt", "evaluate"]
    assert [e["status"] for e in entries] == ["ok"] * 5
    for entry, reply in zip(entries, replies.values(), strict=True):
        _assert_matches(entry, reply)
    # The config's server-round (this test's adapt and evaluate reuse the train config).
    assert [e["round"] for e in entries] == [None, 1, 1, 1, 1]
    assert set(entries[2]["arrays"][protocol.ARRAYS]) == {newton.GRAD, newton.HESS}
    assert all(e["time"].endswith("+00:00") for e in entries)
    if Path("/proc/self/fd").is_dir():
        assert synced.count(str(site_dir / AUDIT_FILE)) == 5
    assert (site_dir / AUDIT_FILE).stat().st_mode & 0o777 == 0o600


def test_an_error_reply_is_audited_with_its_code_and_reason(
    tmp_path: Path, task_identity: None
) -> None:
    """A bad cell: the error reply's code and reason are recorded, the cell is not."""
    path = _site_file(tmp_path)
    lines = path.read_text().splitlines()
    cells = lines[3].split(",")
    cells[1] = CANARY_TEXT
    lines[3] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")
    site_dir = tmp_path / "site"
    reply = _send(protocol.STATS, RecordDict({protocol.CONFIG: ConfigRecord(_base())}),
                  _context(path, site_dir))
    assert reply.has_error() and reply.error.code == protocol.DATA_ERROR
    (entry,) = _entries(site_dir)
    assert entry["status"] == "error" and entry["phase"] == "stats" and entry["round"] is None
    _assert_matches(entry, reply)
    assert CANARY_TEXT not in (site_dir / AUDIT_FILE).read_text()


def _read_only(monkeypatch: pytest.MonkeyPatch, site_dir: Path) -> None:
    """The audit file's folder behaves as a read-only file system (root ignores chmod)."""
    real_open = os.open

    def ro_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == site_dir / AUDIT_FILE and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(audit_log.os, "open", ro_open)


@pytest.mark.parametrize("blocked", ["read-only file system", "a folder in its place",
                                     "a symlink in its place"])
def test_a_reply_that_cannot_be_audited_is_not_sent(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, blocked: str,
) -> None:
    """Instead of the stats reply: an error reply naming the audit file, with no data."""
    caplog.set_level(logging.DEBUG)
    site_dir = tmp_path / "site"
    site_dir.mkdir(mode=0o700)
    audit_file = site_dir / AUDIT_FILE
    if blocked == "read-only file system":
        _read_only(monkeypatch, site_dir)
    elif blocked == "a folder in its place":
        audit_file.mkdir()
    else:
        (tmp_path / "elsewhere.jsonl").write_text("")
        audit_file.symlink_to(tmp_path / "elsewhere.jsonl")
    reply = _send(protocol.STATS, RecordDict({protocol.CONFIG: ConfigRecord(_base())}),
                  _context(_site_file(tmp_path), site_dir))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == protocol.SITE_ERROR
    reason = str(reply.error.reason)
    assert reason.startswith("[site canary-site] AuditLogError: cannot write the audit log "
                             f"{audit_file} (")
    assert reason.endswith("the stats reply was not sent")
    assert wire_bytes(reply) < 400  # a short error, not the stats (about 1.2 kB)
    for canary in (str(CANARY_WEIGHT), str(CANARY_GLUCOSE), CANARY_TEXT):
        assert canary not in reason and canary not in caplog.text
    if blocked == "a symlink in its place":
        assert (tmp_path / "elsewhere.jsonl").read_text() == ""


def test_a_reply_without_a_known_site_is_sent_with_a_warning(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture,
) -> None:
    """No site settings, no folder: the error reply leaves, the site's log says unaudited."""
    caplog.set_level(logging.WARNING)
    ctx = Context(run_id=7, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = _send(protocol.STATS, RecordDict({protocol.CONFIG: ConfigRecord(_base())}), ctx)
    assert reply.has_error()
    assert "without an audit entry" in caplog.text
    assert not list(tmp_path.rglob(AUDIT_FILE))


def test_no_canary_patient_value_reaches_the_audit_log(
    tmp_path: Path, task_identity: None
) -> None:
    """Values of every phase are recorded, but no planted value nor a correction weight."""
    _, site_dir = _run_phases(tmp_path)
    raw = (site_dir / AUDIT_FILE).read_bytes()
    numbers = [n for e in _entries(site_dir) for n in _numbers(
        {k: e[k] for k in ("metrics", "arrays")})]
    assert len(numbers) > 100  # the aggregates are there
    correction = load_correction(site_dir, "canary-site", load_source_model(site_dir).digest)
    weights = [c for c in correction["coef"] if abs(c) > 1e-6] + [correction["intercept"]]
    for value in (CANARY_WEIGHT, CANARY_GLUCOSE, *weights):
        assert str(value).encode() not in raw
        assert struct.pack("<d", value) not in raw and struct.pack("<f", value) not in raw
        assert not any(abs(n - value) < 1e-9 for n in numbers)
    assert CANARY_TEXT.encode() not in raw


def test_audited_returns_the_reply_itself_once_recorded(
    tmp_path: Path, task_identity: None
) -> None:
    """The gate hands back the very reply it recorded (not a copy), appended line by line."""
    from client.egress import build_reply
    from client.site import SiteSettings
    from shared.schema import load_schema

    msg = Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=1,
                  message_type=protocol.STATS)
    reply = build_reply(msg, shared_features=load_schema("synthetic").shared_features,
                        metrics={"rows": [3.0], "num-examples": 3.0})
    site = SiteSettings("s", tmp_path / "x.csv", (), tmp_path / "site")
    assert audited(msg, reply, "stats", site) is reply
    assert audited(msg, reply, "stats", site) is reply
    entries = _entries(tmp_path / "site")
    assert len(entries) == 2 and entries[0]["metrics"] == {
        "metrics": {"num-examples": 3.0, "rows": [3.0]}}
    assert read_audit(tmp_path / "site").totals() == {
        "7": {"replies": 2, "bytes": 2 * wire_bytes(reply), "errors": 0}}
