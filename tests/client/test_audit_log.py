"""Every reply a site sends is in its own audit log first; what cannot be recorded is not sent."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import audit_log
from client.audit_log import (
    AUDIT_FILE,
    GENESIS,
    NO_PREV,
    NOT_JSON,
    PREV_MISMATCH,
    append,
    audited,
    head_found,
    read_audit,
    record_event,
    verify_chain,
)
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
    """Six replies (stats, train, Newton, group, adapt, evaluate): six entries, each fsynced."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        proc = Path(f"/proc/self/fd/{fd}")
        synced.append(str(proc.readlink()) if proc.is_symlink() else str(fd))
        real_fsync(fd)

    monkeypatch.setattr(audit_log.os, "fsync", fsync)
    replies, site_dir = _run_phases(tmp_path)
    entries = _entries(site_dir)
    assert [e["phase"] for e in entries] == ["stats", "train", "train", "train", "adapt",
                                             "evaluate"]
    assert [e["status"] for e in entries] == ["ok"] * 6
    for entry, reply in zip(entries, replies.values(), strict=True):
        _assert_matches(entry, reply)
    # The config's server-round (this test's adapt and evaluate reuse the train config).
    assert [e["round"] for e in entries] == [None, 1, 1, 1, 1, 1]
    assert set(entries[2]["arrays"][protocol.ARRAYS]) == {newton.GRAD, newton.HESS}
    assert set(entries[3]["arrays"][protocol.ARRAYS]) == {newton.GRAD, newton.HESS}
    assert all(e["time"].endswith("+00:00") for e in entries)
    if Path("/proc/self/fd").is_dir():
        assert synced.count(str(site_dir / AUDIT_FILE)) == 6
    assert (site_dir / AUDIT_FILE).stat().st_mode & 0o777 == 0o600
    check = verify_chain(site_dir)
    assert check.ok and check.entries == 6


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
                             "<site-dir>/audit.jsonl (")
    assert str(tmp_path) not in reason  # the site's paths stay at the site
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


# ---------------------------------------------------------------- the hash chain


def _sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _log_of(site_dir: Path, n: int) -> Path:
    """A site folder whose audit log holds ``n`` small entries (``i`` = 0 .. n-1)."""
    path = site_dir / AUDIT_FILE
    for i in range(n):
        append(path, {"i": i, "phase": "stats", "status": "ok"})
    return path


def test_every_entry_names_the_sha256_of_the_line_before_it(tmp_path: Path) -> None:
    """The first prev is 64 zeros, each next the sha256 of the line as stored; head is the last."""
    path = tmp_path / "site" / AUDIT_FILE
    heads = [append(path, {"i": i, "note": "x" * (i * 40_000)}) for i in range(4)]
    heads.append(record_event(tmp_path / "site", "ledger-reset", run=7))
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 6
    lines = lines[:-1]
    assert [json.loads(line)["prev"] for line in lines] == [GENESIS] + [_sha(x) for x in lines[:-1]]
    assert heads == [_sha(line) for line in lines]
    check = verify_chain(tmp_path / "site")
    assert check.ok and (check.line, check.reason) == (None, None)
    assert (check.entries, check.head, check.path) == (5, heads[-1], path)
    assert verify_chain(path) == check  # the folder or the file
    assert path.stat().st_mode & 0o777 == 0o600


def test_an_empty_log_has_the_zero_head(tmp_path: Path) -> None:
    (tmp_path / AUDIT_FILE).write_bytes(b"")
    check = verify_chain(tmp_path)
    assert check.ok and (check.entries, check.head) == (0, GENESIS)
    with pytest.raises(FileNotFoundError):
        verify_chain(tmp_path / "nowhere")


def test_the_last_line_is_found_whatever_the_block_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read back in blocks of 7 bytes: a line spans many blocks, a newline ends one exactly."""
    monkeypatch.setattr(audit_log, "_TAIL_BLOCK", 7)
    path = _log_of(tmp_path, 6)
    assert verify_chain(tmp_path).ok
    monkeypatch.setattr(audit_log, "_TAIL_BLOCK", len(path.read_bytes().split(b"\n")[-2]) + 1)
    append(path, {"i": 6})
    assert verify_chain(tmp_path).ok and verify_chain(tmp_path).entries == 7


def _rewrite(path: Path, how: str) -> int:
    """Tamper with a log of 5 entries; return the line number verification must name."""
    lines = path.read_bytes().split(b"\n")[:-1]
    if how == "edit a value in a middle line":  # line 3; line 4's prev no longer matches it
        lines[2] = lines[2].replace(b'"i":2', b'"i":9')
        expected = 4
    elif how == "delete a middle line":  # line 3 goes; the old line 4, now 3, names it
        del lines[2]
        expected = 3
    elif how == "insert a copy of a line":  # a copy of line 2 as line 3: its prev is line 1's
        lines.insert(2, lines[1])
        expected = 3
    elif how == "insert a line chained to the one before":  # line 4 still names line 2
        lines.insert(2, json.dumps({"i": 99, "prev": _sha(lines[1])}).encode())
        expected = 4
    elif how == "insert a line without prev":
        lines.insert(2, b'{"i":99}')
        expected = 3
    elif how == "replace a line with text":
        lines[2] = b"not json at all"
        expected = 3
    else:  # a write cut short: the last line loses its end
        lines[-1] = lines[-1][:20]
        path.write_bytes(b"\n".join(lines))
        return 5
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expected


@pytest.mark.parametrize(("how", "reason"), [
    ("edit a value in a middle line", PREV_MISMATCH),
    ("delete a middle line", PREV_MISMATCH),
    ("insert a copy of a line", PREV_MISMATCH),
    ("insert a line chained to the one before", PREV_MISMATCH),
    ("insert a line without prev", NO_PREV),
    ("replace a line with text", NOT_JSON),
    ("cut the last line short", NOT_JSON),
])
def test_tampering_is_reported_at_the_first_broken_entry(
    tmp_path: Path, how: str, reason: str
) -> None:
    path = _log_of(tmp_path, 5)
    line = _rewrite(path, how)
    check = verify_chain(tmp_path)
    assert not check.ok
    assert check.line == line and check.reason is not None and check.reason.startswith(reason)
    assert check.entries == len(path.read_bytes().rstrip(b"\n").split(b"\n"))
    if how == "cut the last line short":
        assert "cut short" in check.reason


def test_an_entry_after_a_cut_line_starts_its_own_line(tmp_path: Path) -> None:
    """The cut line stays (reported as not JSON); the new entry names it and reads back whole."""
    path = _log_of(tmp_path, 3)
    raw = path.read_bytes()
    cut = raw[: raw.rindex(b"\n", 0, len(raw) - 1) + 1] + b'{"i":3,"phase":"tr'
    path.write_bytes(cut)
    append(path, {"i": 4})
    assert path.read_bytes().startswith(cut + b"\n")
    check = verify_chain(tmp_path)
    assert (check.ok, check.line, check.reason, check.entries) == (False, 3, NOT_JSON, 4)
    assert json.loads(path.read_bytes().split(b"\n")[3])["prev"] == _sha(b'{"i":3,"phase":"tr')
    log = read_audit(tmp_path)
    assert log.unreadable == [3] and [e["i"] for e in log.entries] == [0, 1, 4]


def test_a_kept_head_reveals_entries_cut_from_the_end_or_a_rewritten_log(
    tmp_path: Path
) -> None:
    """Truncating or re-chaining leaves an intact chain; only the kept head says what changed."""
    path = _log_of(tmp_path, 3)
    kept = verify_chain(tmp_path).head
    append(path, {"i": 3})
    append(path, {"i": 4})
    check = verify_chain(tmp_path, head=kept.upper())
    assert check.ok and check.kept_head_found and check.kept_head_line == 3
    assert head_found(path, kept) and head_found(tmp_path, GENESIS)
    assert verify_chain(tmp_path).kept_head_found is None
    lines = path.read_bytes().split(b"\n")[:-1]
    path.write_bytes(b"\n".join(lines[:2]) + b"\n")  # the last three entries removed
    check = verify_chain(tmp_path, head=kept)
    assert check.ok and check.entries == 2
    assert check.kept_head_found is False and check.kept_head_line is None
    assert not head_found(tmp_path, kept)
    path.unlink()  # rewritten from scratch, correctly chained, one value changed
    for i in (0, 1, 7):
        append(path, {"i": i, "phase": "stats", "status": "ok"})
    assert verify_chain(tmp_path).ok and not head_found(tmp_path, kept)


def test_an_event_is_chained_and_shown_as_an_event(tmp_path: Path) -> None:
    """Time, event, its fields, prev; the table's phase column names it; not a reply."""
    path = _log_of(tmp_path, 1)
    head = record_event(tmp_path, "privacy-ledger-reset", run=7, spent=1.5)
    entry = read_audit(tmp_path).entries[1]
    assert list(entry) == ["time", "event", "run", "spent", "prev"]
    assert entry["event"] == "privacy-ledger-reset" and entry["spent"] == 1.5
    assert entry["prev"] == _sha(path.read_bytes().split(b"\n")[0])
    assert verify_chain(tmp_path).head == head
    log = read_audit(tmp_path)
    row = log.rows()[1]
    assert row[1:] == ("7", "privacy-ledger-reset", "", "", "", "", "event")
    assert log.totals() == {"None": {"replies": 1, "bytes": 0, "errors": 0}}
    with pytest.raises(ValueError, match="prev"):
        record_event(tmp_path, "x", prev=GENESIS)
    with pytest.raises(ValueError, match="prev"):
        append(path, {"prev": GENESIS})
    with pytest.raises(ValueError):  # refused before any folder or file is made
        record_event(tmp_path / "other", "x", value=float("nan"))
    assert not (tmp_path / "other").exists()
    assert verify_chain(tmp_path).entries == 2


def _append_many(path: Path, who: str, start: Any, n: int) -> None:
    """One writer process: wait for the others, then append ``n`` entries as fast as it can."""
    start.wait()
    for i in range(n):
        append(path, {"who": who, "i": i, "pad": "x" * (i * 97 % 3000)})


def test_writers_appending_at_once_keep_the_chain_intact(tmp_path: Path) -> None:
    """Two processes, 50 appends each: each prev is read under the lock that guards the write."""
    path = tmp_path / "site" / AUDIT_FILE
    # The folder exists: what is tested here is the file's lock, not two first mkdirs at once.
    path.parent.mkdir(mode=0o700)
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(2)
    writers = [ctx.Process(target=_append_many, args=(path, who, start, 50))
               for who in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=60)
    assert [w.exitcode for w in writers] == [0, 0]
    check = verify_chain(path)
    assert check.ok, (check.line, check.reason)
    assert check.entries == 100
    entries = read_audit(path.parent).entries
    for who in ("a", "b"):
        assert [e["i"] for e in entries if e["who"] == who] == list(range(50))
