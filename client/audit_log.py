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


def audited(msg: Message, reply: Message, phase: str, site: SiteSettings | None) -> Message:
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
        append(path, describe(msg, reply, phase))
    except Exception as err:  # never send what could not be recorded
        why = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
        if isinstance(err, NotADirectoryError | FileExistsError) and not err.strerror:
            why = "a file is in the way of the folder"  # shared.files.ensure_private_dir
        failure = AuditLogError(f"cannot write the audit log {path} ({why}); the {phase} reply "
                                "was not sent", path)
        return error_reply(msg, failure, phase, site.name)
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
    entry["configs"] = {name: {k: str(v) for k, v in sorted(rec.items())}
                        for name, rec in content.config_records.items()}
    entry["arrays"] = {
        name: {k: {"shape": list(rec[k].shape), "dtype": str(rec[k].dtype),
                   "bytes": len(rec[k].data), "sha256": hashlib.sha256(rec[k].data).hexdigest()}
               for k in rec}
        for name, rec in content.array_records.items()
    }
    return entry


def append(path: Path, entry: Mapping[str, Any]) -> None:
    """Append one entry as a JSON line, on disk (flushed and fsynced) when this returns.

    Parameters
    ----------
    path : Path
        The audit log (created 0600, its folder 0700, if missing; never through a symlink).
    entry : mapping
        JSON-serialisable; NaN must already be ``None``.

    Raises
    ------
    OSError
        If the folder or file cannot be created or written (read-only, full disk...).
    """
    data = (json.dumps(entry, allow_nan=False, separators=(",", ":")) + "\n").encode()
    ensure_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        # Several ClientApp processes of one site may answer at once (one per message): the
        # lock keeps each entry one whole line, whatever the size of the write.
        fcntl.flock(fd, fcntl.LOCK_EX)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            if written <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


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
            run = out.setdefault(str(e.get("run")), {"replies": 0, "bytes": 0, "errors": 0})
            run["replies"] += 1
            run["bytes"] += int(e.get("bytes") or 0)
            run["errors"] += e.get("status") != "ok"
        return out


    def rows(self) -> list[tuple[str, ...]]:
        """One row of text per reply, for a table.

        Time (UTC, to the second), run, phase, round, keys, arrays, bytes, status (with the
        error code).
        """
        out: list[tuple[str, ...]] = []
        for e in self.entries:
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
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
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
