"""Tests of client.check: the summary or the located errors behind ``fedadapt check-data``."""

from __future__ import annotations

import re
from pathlib import Path

from client.check import check_file

HEADER = "age,weight,height,systolic_bp,glucose,diabetes\n"
CANARY = "CANARY7781"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_good_file_summary(tmp_path: Path) -> None:
    """A usable file gives ok, row and label counts and per-feature missing counts."""
    path = _write(tmp_path, HEADER + "50,94.5,182,134,87,0\n" + "65,,153,131,NA,1\n"
                  + "41,70.2,168,300,,0\n" + "52,80.0,170,120,95,\n")
    result = check_file(path, "synthetic", ["glucose"])
    assert result.ok
    assert result.errors == []
    assert (result.rows, result.negatives, result.positives) == (3, 2, 1)
    assert result.rows_without_label == 1
    by_name = {f["feature"]: f for f in result.features}
    assert list(by_name) == ["age", "weight", "height", "systolic_bp", "glucose", "hba1c"]
    assert by_name["weight"]["missing"] == 1
    assert by_name["glucose"]["missing"] == 2
    assert by_name["age"]["missing"] == 0
    bp = by_name["systolic_bp"]
    assert (bp["missing"], bp["out_of_range"], bp["missing_coded"]) == (1, 1, 0)
    assert all(f["used"] and f["present"] for f in result.features if f["feature"] != "hba1c")
    assert not by_name["hba1c"]["used"] and not by_name["hba1c"]["present"]  # not requested
    assert any("without a label" in w for w in result.warnings)


def test_absent_and_unused_features(tmp_path: Path) -> None:
    """An absent optional column counts every row missing; unrequested glucose is unused."""
    header = "age,weight,height,glucose,diabetes\n"
    path = _write(tmp_path, header + "50,94.5,182,87,0\n65,79.4,153,98,1\n")
    result = check_file(path, "synthetic")
    assert result.ok
    by_name = {f["feature"]: f for f in result.features}
    assert by_name["systolic_bp"]["present"] is False
    assert by_name["systolic_bp"]["missing"] == 2
    assert by_name["glucose"]["used"] is False
    assert any("'systolic_bp' is absent" in w for w in result.warnings)


def test_broken_file_errors_with_line_and_column(tmp_path: Path) -> None:
    """A broken file gives ok False and errors located as path:line:column, without values."""
    path = _write(tmp_path, HEADER + "50,94.5,182,134,87,0\n" + f"65,{CANARY},153,131,98,1\n"
                  + "41,70.2,168,118,90,0,7\n")
    result = check_file(path, "synthetic", ["glucose"])
    assert not result.ok
    assert result.rows == 0
    located = [e for e in result.errors if re.match(rf"{re.escape(str(path))}:\d+:\d+", e)]
    assert located[0].startswith(f"{path}:3:2 (column 'weight'): ")
    assert located[1].startswith(f"{path}:4:7: ")
    assert len(located) == 2
    # The last entry is the hint on what to do.
    assert "fedadapt check-data" in result.errors[-1]
    assert all(CANARY not in e for e in result.errors)


def test_unknown_schema_name(tmp_path: Path) -> None:
    """An unknown schema name is not ok and the error names the built-ins."""
    path = _write(tmp_path, HEADER + "50,94.5,182,134,87,0\n")
    result = check_file(path, "cardio")
    assert not result.ok
    assert len(result.errors) == 1
    assert "synthetic" in result.errors[0]
    assert "heart" in result.errors[0]


def test_shared_feature_as_site_feature(tmp_path: Path) -> None:
    """Naming a shared feature as a site feature is reported, not raised."""
    path = _write(tmp_path, HEADER + "50,94.5,182,134,87,0\n")
    result = check_file(path, "synthetic", ["age"])
    assert not result.ok
    assert "'age' is a shared feature" in result.errors[0]


def test_missing_file(tmp_path: Path) -> None:
    """A path that does not exist is reported as an error, not raised."""
    result = check_file(tmp_path / "absent.csv", "synthetic")
    assert not result.ok
    assert "file not found" in result.errors[0]
