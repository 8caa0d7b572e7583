"""``--data heart:DIR``: a wrong folder is named for what is wrong with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.datasets import DatasetError, heart_manifest


def test_a_heart_folder_that_is_missing_a_file_or_incomplete_is_said_so(tmp_path: Path) -> None:
    """Missing folder: "does not exist"; a file: "is a file"; a folder: its missing files."""
    with pytest.raises(DatasetError, match="does not exist"):
        heart_manifest(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        heart_manifest(tmp_path / "file", tmp_path / "out")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DatasetError, match=r"lacks processed\.cleveland\.data"):
        heart_manifest(tmp_path / "dir", tmp_path / "out")
