"""Files on disk, in one place: atomic writes, private folders and files, UTF-8 text."""

from __future__ import annotations

import codecs
import contextlib
import os
import secrets
from pathlib import Path

from shared.errors import FedadaptError


class NotUTF8(FedadaptError, ValueError):
    """Bytes that are not UTF-8 text; ``line`` and ``column`` locate the first bad byte.

    Attributes
    ----------
    line : int
        The line of the first byte that is not UTF-8, from 1.
    column : int
        Its byte within the line, from 1 (a character's column cannot be known there).
    """

    def __init__(self, line: int, column: int) -> None:
        super().__init__(f"{line}:{column}: not UTF-8 text (byte {column} of the line)")
        self.line = line
        self.column = column


def decode_utf8(raw: bytes) -> str:
    """The text of a file's bytes, read as UTF-8; a leading byte-order mark is dropped.

    Parameters
    ----------
    raw : bytes
        The file's content.

    Returns
    -------
    str
        The text.

    Raises
    ------
    NotUTF8
        Locating the first byte that is not UTF-8 (line and byte of the line, after the
        byte-order mark); the bytes themselves are never repeated.
    """
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = body.rfind(b"\n", 0, err.start) + 1
        raise NotUTF8(body.count(b"\n", 0, err.start) + 1, err.start - line_start + 1) from None


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


def ensure_private_dir(path: str | Path) -> Path:
    """Create a directory and any missing parents with mode 0700.

    Directories that already exist are left as they are.

    Parameters
    ----------
    path : str or pathlib.Path
        The directory to create.

    Returns
    -------
    pathlib.Path
        ``path`` as a ``Path``.

    Raises
    ------
    NotADirectoryError
        If ``path`` or one of its parents exists and is not a directory.
    OSError
        If a directory cannot be created (permissions, read-only file system...).
    """
    path = Path(path)
    missing: list[Path] = []
    current = path
    while not current.is_dir():
        # Another process may create the folder between the two checks: look again.
        if (current.exists() or current.is_symlink()) and not current.is_dir():
            raise NotADirectoryError(
                f"{current} exists and is not a directory, so {path} cannot be created "
                "there; move that file away or choose another folder"
            )
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        # Path.mkdir(parents=True) would give the parents the default (umask) mode.
        directory.mkdir(mode=0o700, exist_ok=True)
        directory.chmod(0o700)
    return path


def create_private_file(path: str | Path, data: bytes) -> Path:
    """Create a new file readable only by its owner (mode 0600 from creation on).

    Missing parent folders are created with mode 0700 (:func:`ensure_private_dir`). The file
    is never briefly readable by others, and an existing file (or a symlink) is never
    followed or overwritten.

    Parameters
    ----------
    path : str or Path
        The file to create; it must not exist.
    data : bytes
        Its contents.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        If ``path`` exists.
    """
    path = Path(path)
    ensure_private_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def append_private(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path``, created readable by its owner only (0600) if missing.

    The coordinator's logs of a run (its events, the replies it received) are the
    federation's, not every user's of the machine.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as fh:
        fh.write(text)
