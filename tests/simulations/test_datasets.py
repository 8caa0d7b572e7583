"""`--data` and `--out`: a wrong heart folder said plainly, an earlier run's sites set aside."""

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


def test_a_second_run_sets_aside_the_site_folders_of_sites_not_in_it(tmp_path: Path) -> None:
    """Eight sites, then four into the same --out: the other four's folders moved, kept."""
    from simulations.simulate import set_aside_other_sites

    for name in ("hospital-a", "hospital-e"):
        (tmp_path / "sites" / name).mkdir(parents=True)
        (tmp_path / "sites" / name / "site.key").write_text(name)
    assert set_aside_other_sites(tmp_path, ["hospital-a"]) == ["hospital-e"]
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == ["hospital-a"]
    kept = tmp_path / "earlier-sites" / "hospital-e" / "site.key"
    assert kept.read_text() == "hospital-e"
