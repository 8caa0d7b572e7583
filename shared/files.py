"""Writing files so that a crash never leaves a half-written one: temporary file, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def write_atomically(path: str | Path, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path``; readers see the old file or the complete new one.

    Parameters
    ----------
    path : str or Path
        Destination (its folder must exist).
    data : bytes
        File contents.
    mode : int
        Permissions of the new file, set when the temporary file is created (so a private
        file is never readable by others, even for a moment). 0o600 for secrets.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow the intended mode
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Make the rename itself durable; not every platform can open a folder.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path
