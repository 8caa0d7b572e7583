"""Files on disk, in one place: atomic writes, private folders (0700) and private files (0600)."""

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
