"""What a site sent: every reply is appended to ``audit.jsonl`` in its own folder before it leaves.

One JSON object per line, written with flush and fsync before the reply is handed to Flower:
the time (UTC), the run, the id of the message answered, the phase and training round, the
reply's size on the wire (measured as the coordinator measures it, ``shared.wire``), its record
keys and their values (aggregate numbers and the site's status strings: what egress lets out),
each array's name, shape, dtype, size and sha256 digest (not its values: model weights and
Newton sums are what the digest identifies; the log stays small), and for an error reply its
code and reason. Never a row or a cell value: only what the reply itself carries.

A reply that cannot be recorded is not sent: an error reply naming the audit file (no data)
goes instead. Before the site's settings are known there is no folder to write to; such a reply
(always an error) is sent and the site's log says it was not audited.

The log is a hash chain: each entry's ``prev`` is the sha256 of the line before it, exactly as
stored (64 zeros for the first), so editing, deleting or inserting an entry breaks the chain at
the next line (``verify_chain``). The sha256 of the last line is the log's head: a head kept
elsewhere (a site's change log) also reveals entries cut from the end (``head_found``), which a
chain alone cannot. Events that are not replies (``record_event``) are chained the same way.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flwr.app import Message

from client.correction_store import SiteDirError
from client.egress import error_reply
from client.site import SiteSettings
from shared import protocol
from shared.files import ensure_private_dir
from shared.wire import wire_bytes

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
# The ``prev`` of a log's first entry, and the head of an empty log.
GENESIS = "0" * 64
# Bytes read at a time when looking back for the last line (an entry can be tens of KB).
_TAIL_BLOCK = 64 * 1024

NOT_JSON = "not JSON"
CUT_SHORT = "cut short (no newline at its end: a write interrupted by a crash?)"
NO_PREV = "no prev field"
PREV_MISMATCH = ("its prev does not match the entry before it: an entry was edited, deleted or "
                 "inserted")


class AuditLogError(SiteDirError):
    """The site's audit log cannot be written: the reply it would record is not sent."""


def audit_path(site_dir: str | Path) -> Path:
    """Return where a site's audit log lives.

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.

    Returns
    -------
    Path
        ``site_dir / "audit.jsonl"``.
    """
    return Path(site_dir) / AUDIT_FILE


def audited(msg: Message, reply: Message, phase: str, site: SiteSettings | None,
            repeat: bool = False) -> Message:
    """Record ``reply`` in the site's audit log; return it, or an error reply if that failed.

    Parameters
    ----------
    msg : Message
        The message answered.
    reply : Message
        The reply built for it (a result, an error or a refusal).
    phase : str
        The phase's name (``stats``, ``train``, ``adapt``, ``evaluate``).
    site : SiteSettings or None
        The site, once its settings were resolved; ``None`` before that (nothing to write
        to: the reply is sent unaudited and a warning says so, without any value).
    repeat : bool
        The reply repeats a fixed answer sent before (``client.answers``); the entry says so.

    Returns
    -------
    Message
        ``reply`` once its entry is on disk; otherwise an error reply saying which audit file
        could not be written (``reply`` itself is withheld).
    """
    if site is None:
        log.warning("the %s reply (%s) leaves without an audit entry: the site's settings, "
                    "hence its folder, are not known", phase,
                    "an error" if reply.has_error() else "not an error")
        return reply
    path = audit_path(site.site_dir)
    try:
        entry = describe(msg, reply, phase)
        if repeat:
            entry["repeat"] = True
        append(path, entry)
    except Exception as err:  # never send what could not be recorded
        why = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        if isinstance(err, NotADirectoryError | FileExistsError) and not err.strerror:
            why = "a file is in the way of the folder"  # shared.files.ensure_private_dir
        failure = AuditLogError(f"cannot write the audit log {path} ({why}); the {phase} reply "
                                "was not sent", path)
        return error_reply(msg, failure, phase, site)
    return reply


def describe(msg: Message, reply: Message, phase: str,
             now: datetime | None = None) -> dict[str, Any]:
    """The audit entry of one reply: what it carries, never more.

    Parameters
    ----------
    msg : Message
        The message answered (run, id, round).
    reply : Message
        The reply.
    phase : str
        The phase's name.
    now : datetime, optional
        The time to record (UTC now by default).

    Returns
    -------
    dict
        ``time``, ``run``, ``node``, ``reply_to``, ``phase``, ``type``, ``round``, ``status``
        (``ok``, ``error`` or ``refused``), ``bytes``; for a result ``metrics`` and
        ``configs`` (record -> key -> value) and ``arrays`` (record -> name -> shape, dtype,
        bytes, sha256); for an error ``error`` (code and reason).
    """
    meta = msg.metadata
    entry: dict[str, Any] = {
        "time": (now or datetime.now(UTC)).isoformat(timespec="milliseconds"),
        "run": meta.run_id,
        "node": meta.dst_node_id,
        "reply_to": meta.message_id,
        "phase": phase,
        "type": meta.message_type,
        "round": _round(msg),
        "status": "ok",
        "bytes": wire_bytes(reply),
    }
    if reply.has_error():
        code = int(reply.error.code)
        entry["status"] = "refused" if code == protocol.REFUSED else "error"
        entry["error"] = {"code": code, "reason": str(reply.error.reason)}
        return entry
    content = reply.content
    entry["metrics"] = {name: {k: _number(v) for k, v in sorted(rec.items())}
                        for name, rec in content.metric_records.items()}
    entry["configs"] = {name: {k: _text(v) for k, v in sorted(rec.items())}
                        for name, rec in content.config_records.items()}
    asked = msg.content.config_records.get(protocol.SECAGG_RECORD) if msg.has_content() else None
    if asked is not None:  # a secure sum's stage; "masked": the reply's vector was masked
        entry["secagg"] = {"stage": str(asked.get(protocol.STAGE)),
                           "sum": str(asked.get(protocol.SUM_ID)),
                           "masked": protocol.MASKED in content.array_records.get(
                               protocol.ARRAYS, {})}
    entry["arrays"] = {
        name: {k: {"shape": list(rec[k].shape), "dtype": str(rec[k].dtype),
                   "bytes": len(rec[k].data), "sha256": hashlib.sha256(rec[k].data).hexdigest()}
               for k in rec}
        for name, rec in content.array_records.items()
    }
    return entry


def record_event(site_dir: str | Path, event: str, **fields: Any) -> str:
    """Append an entry that is not a reply (a privacy-ledger reset...) to the site's audit log.

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.
    event : str
        What happened, in a word or two (shown in the table's phase column).
    **fields
        What else to record (JSON-serialisable, no NaN); never a row or a cell value.

    Returns
    -------
    str
        The sha256 of the line written: the log's new head.

    Raises
    ------
    ValueError
        If ``fields`` names ``time`` or ``prev`` (the log sets them), or a value is NaN.
    OSError
        If the log cannot be written.
    """
    if reserved := {"time", "prev"} & fields.keys():
        raise ValueError(f"an event's fields cannot be named {sorted(reserved)}: the audit log "
                         "sets them")
    entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event,
             **fields}
    return append(audit_path(site_dir), entry)


def append(path: Path, entry: Mapping[str, Any]) -> str:
    """Append one entry, chained to the last line, as a JSON line fsynced before returning.

    Parameters
    ----------
    path : Path
        The audit log (created 0600, its folder 0700, if missing; never through a symlink).
    entry : mapping
        JSON-serialisable; NaN must already be ``None``. Its ``prev`` is added here: the sha256
        of the log's last line, read under the lock that guards the write.

    Returns
    -------
    str
        The sha256 of the line written: the log's new head.

    Raises
    ------
    ValueError
        If ``entry`` already has a ``prev``.
    OSError
        If the folder or file cannot be created, read or written (read-only, full disk...).
    """
    if "prev" in entry:
        raise ValueError("an audit entry's prev is set by the log, not by its writer")
    # Serialised (so checked) before the file is touched; the prev, 64 hex digits closing the
    # line, is filled in under the lock.
    template = json.dumps({**entry, "prev": GENESIS}, allow_nan=False,
                          separators=(",", ":")).encode()
    ensure_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        # Several ClientApp processes of one site may answer at once (one per message): the
        # lock keeps each entry one whole line, and the last line the one its prev names.
        fcntl.flock(fd, fcntl.LOCK_EX)
        last, whole = _last_line(fd, path)
        prev = GENESIS if last is None else _sha256(last)
        line = template[: -len(GENESIS) - 2] + f'{prev}"}}'.encode()
        # After a write cut short, the new entry starts its own line; the cut one stays.
        data = (b"" if whole else b"\n") + line + b"\n"
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    return _sha256(line)


def _sha256(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _last_line(fd: int, path: Path) -> tuple[bytes | None, bool]:
    """The file's last line (without its newline; ``None`` if empty), and if a newline ends it.

    Read backwards in blocks from the end until a newline is found (or the file's start).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None, True
    whole = _pread(fd, 1, size - 1, path) == b"\n"
    end = size - 1 if whole else size
    blocks: list[bytes] = []
    while end > 0:
        start = max(0, end - _TAIL_BLOCK)
        block = _pread(fd, end - start, start, path)
        newline = block.rfind(b"\n")
        if newline >= 0:
            blocks.append(block[newline + 1:])
            break
        blocks.append(block)
        end = start
    return b"".join(reversed(blocks)), whole


def _pread(fd: int, size: int, offset: int, path: Path) -> bytes:
    """Exactly ``size`` bytes at ``offset`` (the file does not shrink under the lock)."""
    parts: list[bytes] = []
    while size > 0:
        part = os.pread(fd, size, offset)
        if not part:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        parts.append(part)
        size -= len(part)
        offset += len(part)
    return b"".join(parts)


@dataclass(frozen=True)
class ChainCheck:
    """What checking an audit log's hash chain found.

    ``entries`` counts its lines (readable or not); ``head`` is the sha256 of the last one
    (``GENESIS`` for an empty log). When the chain is broken, ``line`` is the 1-based number of
    the first broken entry and ``reason`` says why. With a kept head to look for,
    ``kept_head_line`` is the line whose sha256 it is (0 for ``GENESIS``), ``None`` if no
    line's is: entries were removed or rewritten.
    """

    path: Path
    entries: int
    head: str
    line: int | None = None
    reason: str | None = None
    kept_head: str | None = None
    kept_head_line: int | None = None

    @property
    def ok(self) -> bool:
        """Whether every entry's prev is the sha256 of the line before it."""
        return self.line is None

    @property
    def kept_head_found(self) -> bool | None:
        """Whether the kept head is the sha256 of a line (``None`` if none was given)."""
        return None if self.kept_head is None else self.kept_head_line is not None

    def as_dict(self) -> dict[str, Any]:
        """The check as JSON holds it."""
        return {"path": str(self.path), "entries": self.entries, "head": self.head,
                "ok": self.ok, "line": self.line, "reason": self.reason,
                "kept_head": self.kept_head, "kept_head_found": self.kept_head_found,
                "kept_head_line": self.kept_head_line}


def verify_chain(site_dir_or_path: str | Path, head: str | None = None) -> ChainCheck:
    """Check an audit log's hash chain, and optionally that a head kept earlier is still in it.

    An edited entry breaks the chain at the line after it (whose prev no longer matches); a
    deleted one at the line that followed it; an inserted one at itself or the line after it.
    The last line's edit, and entries cut from the end, leave a valid chain: only a head kept
    elsewhere reveals them (it is then no line's sha256).

    Parameters
    ----------
    site_dir_or_path : str or Path
        The site's private folder, or its audit log.
    head : str, optional
        A head (sha256 hex) kept elsewhere, to look for among the lines' sha256.

    Returns
    -------
    ChainCheck
        The number of entries, the head, the first broken entry and why, where the kept head is.

    Raises
    ------
    FileNotFoundError
        If there is no audit log there.
    """
    path = Path(site_dir_or_path)
    if path.is_dir():
        path = audit_path(path)
    kept = head.strip().lower() if head is not None else None
    kept_line = 0 if kept == GENESIS else None
    expected = GENESIS
    number = 0
    broken_line: int | None = None
    reason: str | None = None
    with path.open("rb") as fh:
        for raw in fh:
            number += 1
            line = raw.removesuffix(b"\n")
            digest = _sha256(line)
            if kept_line is None and digest == kept:
                kept_line = number
            if reason is None:
                reason = _link_error(line, expected, whole=raw.endswith(b"\n"))
                broken_line = None if reason is None else number
            expected = digest  # the next line's prev; the head after the last
    return ChainCheck(path, number, expected, line=broken_line, reason=reason, kept_head=kept,
                      kept_head_line=kept_line)


def head_found(site_dir_or_path: str | Path, head: str) -> bool:
    """Whether a head kept elsewhere is still the sha256 of a line of the audit log.

    If not, entries were removed or rewritten. If it is and the chain is intact
    (``verify_chain``), every line up to it is as it was when the head was kept.

    Parameters
    ----------
    site_dir_or_path : str or Path
        The site's private folder, or its audit log.
    head : str
        The kept head (sha256 hex; 64 zeros, an empty log's, is in every log).

    Returns
    -------
    bool
        Whether some line's sha256 is ``head``.
    """
    return bool(verify_chain(site_dir_or_path, head).kept_head_found)


def _link_error(line: bytes, expected: str, whole: bool) -> str | None:
    """Why one line does not continue the chain (``None`` if it does)."""
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, absurdly nested
        entry = None
    if not isinstance(entry, dict):
        return NOT_JSON if whole else f"{NOT_JSON}, {CUT_SHORT}"
    if not whole:
        return CUT_SHORT
    if "prev" not in entry:
        return NO_PREV
    return None if entry["prev"] == expected else PREV_MISMATCH


@dataclass
class AuditLog:
    """A site's audit log as read back: its entries and the lines that could not be read."""

    path: Path
    entries: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)

    def totals(self) -> dict[str, dict[str, int]]:
        """Per run: replies, bytes sent on the wire and error (or refusal) replies."""
        out: dict[str, dict[str, int]] = {}
        for e in self.entries:
            if "event" in e:  # not a reply
                continue
            run = out.setdefault(str(e.get("run")), {"replies": 0, "bytes": 0, "errors": 0})
            run["replies"] += 1
            run["bytes"] += int(e.get("bytes") or 0)
            run["errors"] += e.get("status") != "ok"
        return out


    def rows(self) -> list[tuple[str, ...]]:
        """One row of text per entry, for a table.

        Time (UTC, to the second), run, phase, round, keys, arrays, bytes, status (with the
        error code). An event (not a reply) has its name as phase and ``event`` as status.
        """
        out: list[tuple[str, ...]] = []
        for e in self.entries:
            if "event" in e:
                out.append((str(e.get("time", ""))[:19].replace("T", " "),
                            str(e.get("run", "")), str(e["event"]), "", "", "", "", "event"))
                continue
            status = str(e.get("status", "?"))
            if "error" in e:
                status += f" {e['error'].get('code', '')}"
            rnd = e.get("round")
            out.append((str(e.get("time", ""))[:19].replace("T", " "), str(e.get("run", "")),
                        str(e.get("phase", "")), "" if rnd is None else str(rnd),
                        str(keys_count(e)), str(arrays_count(e)),
                        f"{int(e.get('bytes') or 0):,}", status))
        return out


def read_audit(site_dir: str | Path) -> AuditLog:
    """Read a site's audit log.

    Parameters
    ----------
    site_dir : str or Path
        The site's private folder.

    Returns
    -------
    AuditLog
        Its entries in order; numbers of lines that are not JSON objects (a write cut short by
        a crash) in ``unreadable``.

    Raises
    ------
    FileNotFoundError
        If the folder has no audit log.
    """
    path = audit_path(site_dir)
    result = AuditLog(path)
    # Lines as the chain numbers them: split at newlines only; bytes that are not UTF-8
    # (tampering) make an unreadable line, not a crash.
    with path.open(encoding="utf-8", errors="replace", newline="\n") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                entry = None
            if isinstance(entry, dict):
                result.entries.append(entry)
            else:
                result.unreadable.append(number)
    return result


def keys_count(entry: Mapping[str, Any]) -> int:
    """Metric and site-record keys of one entry (0 for an error reply)."""
    records: Iterable[Mapping[str, Any]] = [*entry.get("metrics", {}).values(),
                                            *entry.get("configs", {}).values()]
    return sum(len(r) for r in records)


def arrays_count(entry: Mapping[str, Any]) -> int:
    """Arrays of one entry."""
    return sum(len(r) for r in entry.get("arrays", {}).values())


def _text(value: Any) -> str:
    """A config value as text; a key or an encrypted share as its size and digest."""
    if isinstance(value, bytes):
        return f"{len(value)} bytes, sha256 {hashlib.sha256(value).hexdigest()[:16]}"
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return f"{len(value)} byte strings, sha256 " + hashlib.sha256(
            b"".join(hashlib.sha256(v).digest() for v in value)).hexdigest()[:16]
    return str(value)


def _round(msg: Message) -> int | None:
    config = msg.content.config_records.get(protocol.CONFIG) if msg.has_content() else None
    return protocol.absolute_round(config)


def _number(value: Any) -> Any:
    """Numbers as JSON holds them: NaN and infinities become null."""
    if isinstance(value, list):
        return [_number(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
