"""Files on disk: private folders and files, atomic writes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shared.files import create_private_file, ensure_private_dir, write_atomically


def test_private_file_is_0600_from_creation_and_never_overwritten(tmp_path: Path) -> None:
    """Parents 0700, the file 0600, an existing file (or symlink) refused."""
    path = create_private_file(tmp_path / "a" / "b" / "key", b"secret")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(FileExistsError):
        create_private_file(path, b"other")
    assert path.read_bytes() == b"secret"
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        create_private_file(link, b"x")
    assert not (tmp_path / "elsewhere").exists()


def test_private_dir_under_a_file_says_what_to_do(tmp_path: Path) -> None:
    """A folder that would go under a file: a clear error naming the file."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        ensure_private_dir(tmp_path / "f" / "site")


def test_atomic_write_keeps_the_requested_mode(tmp_path: Path) -> None:
    """The mode is set at creation (the umask does not widen it); content replaced whole."""
    path = write_atomically(tmp_path / "r.csv", b"one", mode=0o600)
    write_atomically(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]
