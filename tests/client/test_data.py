"""Tests of client.data: reading a site file against the schema, and never leaking a cell."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from client.check import check_file
from client.data import DataError, Problem, SiteData, read_site_data
from shared.schema import Schema, SchemaError, load_schema

ROOT = Path(__file__).resolve().parents[2]
HEART_DIR = ROOT.parent / "shared" / "data" / "uci-heart-disease"

HEADER = "age,weight,height,systolic_bp,glucose,diabetes\n"
ROW_A = "50,94.5,182,134,87,0\n"
ROW_B = "65,79.4,153,131,98,1\n"
ROW_C = "41,70.2,168,118,NA,0\n"
CANARY = "CANARY7781"
NUM_CANARY = "777.123"

HEART_OK = "63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n"


@pytest.fixture
def synthetic() -> Schema:
    return load_schema("synthetic")


@pytest.fixture
def heart() -> Schema:
    return load_schema("heart")


def _write(tmp_path: Path, text: str, name: str = "site.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def _data_error(
    path: Path, schema: Schema, site_features: tuple[str, ...] = ("glucose",)
) -> DataError:
    with pytest.raises(DataError) as info:
        read_site_data(path, schema, site_features)
    return info.value


def _assert_no_leak(
    canary: str, path: Path, caplog: pytest.LogCaptureFixture,
    err: DataError | None = None, data: SiteData | None = None,
) -> None:
    """Assert the canary is in no problem, no error text, no warning and no log record."""
    # The file's own path may contain any digits (pytest numbers its folders): drop it first.
    def scrub(text: str) -> str:
        return text.replace(str(path), "<path>")

    texts: list[str] = []
    if err is not None:
        assert err.problems, "a DataError must list at least one problem"
        for p in err.problems:
            texts += [p.message, p.column_name, scrub(str(p))]
        texts.append(scrub(str(err)))
    if data is not None:
        texts += [scrub(w) for w in data.warnings]
    texts += [scrub(r.getMessage()) for r in caplog.records]
    for text in texts:
        assert canary not in text


def _only(err: DataError) -> Problem:
    assert len(err.problems) == 1, [str(p) for p in err.problems]
    return err.problems[0]


# ------------------------------------------------------------------ good files


def test_good_file_values_labels_and_lines(tmp_path: Path, synthetic: Schema) -> None:
    """A valid file gives float features, 0/1 labels, line numbers and no warnings."""
    path = _write(tmp_path, HEADER + ROW_A + ROW_B + ROW_C)
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.n_rows == 3
    assert data.label_counts == (2, 1)
    assert list(data.label) == [0, 1, 0]
    assert list(data.line_numbers) == [2, 3, 4]
    assert data.shared_columns == ("age", "weight", "height", "systolic_bp")
    assert data.site_columns == ("glucose",)
    assert list(data.features.columns) == ["age", "weight", "height", "systolic_bp", "glucose"]
    assert data.features.iloc[0].tolist() == [50.0, 94.5, 182.0, 134.0, 87.0]
    assert math.isnan(data.features["glucose"].iloc[2])
    assert data.marked_missing["glucose"].tolist() == [False, False, True]
    assert data.summary["glucose"].missing == 1
    assert data.warnings == []


def test_site_feature_not_requested_is_not_used(tmp_path: Path, synthetic: Schema) -> None:
    """Without site features only the shared columns are returned."""
    path = _write(tmp_path, HEADER + ROW_A + ROW_B)
    data = read_site_data(path, synthetic)
    assert list(data.features.columns) == ["age", "weight", "height", "systolic_bp"]
    assert data.site_columns == ()


def test_unknown_site_feature_is_schema_error(tmp_path: Path, synthetic: Schema) -> None:
    """Asking for a shared or unknown feature as a site feature fails before reading."""
    path = _write(tmp_path, HEADER + ROW_A + ROW_B)
    with pytest.raises(SchemaError):
        read_site_data(path, synthetic, ["age"])
    with pytest.raises(SchemaError):
        read_site_data(path, synthetic, ["insulin"])


def test_utf8_bom_is_accepted(tmp_path: Path, synthetic: Schema) -> None:
    """A UTF-8 file with a byte-order mark reads like one without (first column is age)."""
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (HEADER + ROW_A + ROW_B).encode("utf-8"))
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.n_rows == 2
    assert data.features["age"].tolist() == [50.0, 65.0]


def test_crlf_line_ends_are_accepted(tmp_path: Path, synthetic: Schema) -> None:
    """Windows line ends read like Unix ones, with the same line numbers."""
    path = _write(tmp_path, (HEADER + ROW_A + ROW_B).replace("\n", "\r\n"))
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.n_rows == 2
    assert list(data.line_numbers) == [2, 3]


def test_blank_lines_are_ignored(tmp_path: Path, synthetic: Schema) -> None:
    """Blank lines (before the header, between and after rows) are skipped; lines stay true."""
    path = _write(tmp_path, "\n" + HEADER + ROW_A + "\n   \n" + ROW_B + "\n\n")
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.n_rows == 2
    assert list(data.line_numbers) == [3, 6]
    assert data.rows_without_label == 0
    assert data.warnings == []


def test_out_of_range_becomes_missing_and_is_counted(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """An implausible value is not an error: it becomes missing, is counted and warned about."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEADER + ROW_A + f"65,79.4,153,{NUM_CANARY},98,1\n" + ROW_C)
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.n_rows == 3
    bp = data.summary["systolic_bp"]
    assert (bp.out_of_range, bp.missing, bp.missing_coded) == (1, 1, 0)
    assert math.isnan(data.features["systolic_bp"].iloc[1])
    assert not data.marked_missing["systolic_bp"].iloc[1]
    assert any("'systolic_bp'" in w and "1 value(s) outside" in w for w in data.warnings)
    _assert_no_leak(NUM_CANARY, path, caplog, data=data)
    assert "777" not in " ".join(data.warnings).replace(str(path), "")


def test_missing_markers_become_missing(tmp_path: Path, synthetic: Schema) -> None:
    """Both markers, "" and "NA", are missing values marked as such."""
    path = _write(tmp_path, HEADER + "50,,182,NA,87,0\n" + ROW_B)
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.summary["weight"].missing == 1
    assert data.summary["systolic_bp"].missing == 1
    assert data.marked_missing["weight"].tolist() == [True, False]
    assert data.marked_missing["systolic_bp"].tolist() == [True, False]
    assert math.isnan(data.features["weight"].iloc[0])


def test_rows_without_label_are_skipped_and_counted(
    tmp_path: Path, synthetic: Schema
) -> None:
    """Rows whose label is empty or NA are dropped, counted and warned about."""
    path = _write(tmp_path, HEADER + ROW_A + "60,80,170,120,90,\n" + ROW_B
                  + "61,81,171,121,91,NA\n")
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.n_rows == 2
    assert data.rows_without_label == 2
    assert list(data.line_numbers) == [2, 4]
    assert any("2 row(s) without a label were skipped" in w for w in data.warnings)


def test_one_label_class_is_a_warning(tmp_path: Path, synthetic: Schema) -> None:
    """A file whose rows are all negative is usable, with a warning."""
    path = _write(tmp_path, HEADER + ROW_A + ROW_C)
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.label_counts == (2, 0)
    assert any("same label class" in w for w in data.warnings)


def test_missing_optional_column_is_a_warning(
    tmp_path: Path, synthetic: Schema
) -> None:
    """Without the optional systolic_bp the file is used: a warning, and all values missing."""
    header = "age,weight,height,glucose,diabetes\n"
    path = _write(tmp_path, header + "50,94.5,182,87,0\n65,79.4,153,98,1\n")
    data = read_site_data(path, synthetic, ["glucose"])
    assert data.n_rows == 2
    assert data.summary["systolic_bp"].present is False
    assert "systolic_bp" in data.features.columns
    assert data.features["systolic_bp"].isna().all()
    assert data.marked_missing["systolic_bp"].all()
    assert any("'systolic_bp' is absent" in w for w in data.warnings)


def test_absent_unused_site_feature_is_silent(tmp_path: Path, synthetic: Schema) -> None:
    """A file without glucose, read without site features, gives no warning about it."""
    header = "age,weight,height,systolic_bp,diabetes\n"
    path = _write(tmp_path, header + "50,94.5,182,134,0\n65,79.4,153,131,1\n")
    data = read_site_data(path, synthetic)
    assert data.summary["glucose"].present is False
    assert data.warnings == []


def test_warnings_are_logged_without_values(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """Each warning is logged; the info line carries counts only."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEADER + ROW_A + f"{NUM_CANARY},79.4,153,131,98,0\n")
    data = read_site_data(path, synthetic, ["glucose"])
    logged = [r.getMessage() for r in caplog.records]
    for w in data.warnings:
        assert w in logged
    assert any("2 rows (2 negative, 0 positive)" in m for m in logged)
    _assert_no_leak(NUM_CANARY, path, caplog, data=data)


# ------------------------------------------------------------------ errors


def test_wrong_type_names_line_and_column(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """Text in a numeric column is an error at its exact line and column, value not repeated."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEADER + ROW_A + f"65,{CANARY},153,131,98,1\n")
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.path, p.line, p.column, p.column_name) == (str(path), 3, 2, "weight")
    assert "not a number" in p.message
    assert str(p).startswith(f"{path}:3:2 (column 'weight'): ")
    _assert_no_leak(CANARY, path, caplog, err=err)


def test_every_wrong_cell_is_reported(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """All defective cells of a file are listed, each at its own line and column."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEADER + f"{CANARY},94.5,182,134,87,0\n" + ROW_B
                  + f"65,79.4,153,131,{CANARY},1\n")
    err = _data_error(path, synthetic)
    assert [(p.line, p.column, p.column_name) for p in err.problems] == [
        (2, 1, "age"), (4, 5, "glucose"),
    ]
    _assert_no_leak(CANARY, path, caplog, err=err)


def test_non_finite_number_is_wrong_type(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """``inf`` and ``nan`` parse as floats but are not accepted as values."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEADER + ROW_A + "inf,79.4,153,131,nan,1\n")
    err = _data_error(path, synthetic)
    assert [(p.line, p.column) for p in err.problems] == [(3, 1), (3, 5)]
    _assert_no_leak("inf", path, caplog, err=err)


def test_row_with_too_many_fields(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A row with an extra field is an error at the first extra column."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEADER + ROW_A + f"65,79.4,153,131,98,1,{CANARY}\n")
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.line, p.column, p.column_name) == (3, 7, "")
    assert p.message == "row has 7 fields, expected 6"
    _assert_no_leak(CANARY, path, caplog, err=err)


def test_row_with_too_few_fields(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A short row is an error at the first missing column."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEADER + f"{CANARY},79.4,153\n" + ROW_B)
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.line, p.column) == (2, 4)
    assert p.message == "row has 3 fields, expected 6"
    _assert_no_leak(CANARY, path, caplog, err=err)


def test_missing_required_column(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A header without the required age column is an error on line 1 naming age."""
    caplog.set_level(logging.DEBUG)
    header = "weight,height,systolic_bp,glucose,diabetes\n"
    path = _write(tmp_path, header + f"{CANARY},182,134,87,0\n")
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.line, p.column_name) == (1, "age")
    assert "required column is missing" in p.message
    _assert_no_leak(CANARY, path, caplog, err=err)


def test_missing_label_column(tmp_path: Path, synthetic: Schema) -> None:
    """A header without the label column is an error naming the label column."""
    path = _write(tmp_path, "age,weight,height,systolic_bp,glucose\n50,94.5,182,134,87\n")
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.line, p.column_name) == (1, "diabetes")
    assert "label column is missing" in p.message


def test_unknown_extra_column(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """An undeclared column is located (line 1, its position) but its name is never shown."""
    caplog.set_level(logging.DEBUG)
    header = f"age,weight,{CANARY},height,systolic_bp,glucose,diabetes\n"
    path = _write(tmp_path, header + "50,94.5,x,182,134,87,0\n")
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.line, p.column, p.column_name) == (1, 3, "")
    assert "1 column name(s)" in p.message and "position 3" in p.message
    assert "age, weight, height, systolic_bp, glucose, hba1c, diabetes" in p.message
    _assert_no_leak(CANARY, path, caplog, err=err)


def test_header_merged_with_first_row_shows_no_value(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A lost line break glues the first patient to the header: none of its values is echoed."""
    caplog.set_level(logging.DEBUG)
    merged = HEADER.rstrip("\n") + f"50,94.5,182,134,{NUM_CANARY},1\n"
    path = _write(tmp_path, merged + ROW_B + ROW_C)
    err = _data_error(path, synthetic)
    text = str(err)
    assert f"{path}:1:" in text and "not declared" in text
    for value in (NUM_CANARY, "diabetes50", "94.5", "182", "134"):
        _assert_no_leak(value, path, caplog, err=err)
    result = check_file(path, "synthetic", ["glucose"])
    assert not result.ok
    assert not any(NUM_CANARY in line for line in [*result.errors, *result.warnings])


@pytest.mark.parametrize("shift", ["prepend", "drop-first"])
def test_header_cells_shifted_by_one_show_no_value(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture, shift: str
) -> None:
    """A header shifted by one cell (extra leading cell, or its first name lost) leaks nothing."""
    caplog.set_level(logging.DEBUG)
    names = HEADER.rstrip("\n").split(",")
    header = ",".join([CANARY, *names] if shift == "prepend" else names[1:]) + "\n"
    row = f"50,94.5,182,134,{NUM_CANARY},1\n"
    path = _write(tmp_path, header + row + ROW_B)
    err = _data_error(path, synthetic)
    assert all(p.path == str(path) and p.line >= 1 for p in err.problems)
    _assert_no_leak(CANARY, path, caplog, err=err)
    _assert_no_leak(NUM_CANARY, path, caplog, err=err)


@pytest.mark.parametrize("cell", ["\u0666\u0663", "\uff16\uff13", "6_3", "63\u00a0", "\u00a063",
                                  "0x3f", "1,5", "63.", "+-63", "nan", "infinity"])
def test_only_ascii_decimal_numbers_are_numbers(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture, cell: str
) -> None:
    """Digits of other scripts, underscores and non-ASCII spaces are "not a number", located."""
    caplog.set_level(logging.DEBUG)
    if cell == "63.":  # a trailing point is plain decimal notation: accepted
        data = read_site_data(_write(tmp_path, HEADER + f"{cell},79.4,153,131,98,1\n"),
                              synthetic, ("glucose",))
        assert data.features["age"].tolist() == [63.0]
        return
    quoted = f'"{cell}"' if "," in cell else cell
    path = _write(tmp_path, HEADER + ROW_A + f"{quoted},79.4,153,131,98,1\n")
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.line, p.column, p.column_name) == (3, 1, "age")
    assert "not a number" in p.message
    _assert_no_leak(cell, path, caplog, err=err)


def test_ascii_spaces_around_numbers_are_fine(tmp_path: Path, synthetic: Schema) -> None:
    """Spaces and tabs around a cell are ignored; signs and exponents are numbers."""
    path = _write(tmp_path, HEADER + " 63 ,\t79.4,1.53e2,+131,-0.5e1 ,1\n")
    data = read_site_data(path, synthetic, ("glucose",))
    assert data.features.iloc[0].tolist()[:4] == [63.0, 79.4, 153.0, 131.0]


def test_duplicate_header_column(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A column named twice is an error at its second position."""
    caplog.set_level(logging.DEBUG)
    header = "age,weight,height,weight,systolic_bp,glucose,diabetes\n"
    path = _write(tmp_path, header + f"50,94.5,182,{CANARY},134,87,0\n")
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.line, p.column, p.column_name) == (1, 4, "weight")
    assert "twice" in p.message
    _assert_no_leak(CANARY, path, caplog, err=err)


def test_missing_header_does_not_echo_first_row(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A file exported without its header line is one error that quotes no patient value."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, f"50,{NUM_CANARY},182,134,87,0\n" + ROW_B)
    err = _data_error(path, synthetic)
    p = _only(err)
    assert (p.line, p.column, p.column_name) == (1, 1, "")
    assert "header line" in p.message
    _assert_no_leak(NUM_CANARY, path, caplog, err=err)
    _assert_no_leak("182", path, caplog, err=err)


def test_unknown_label_value(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A label outside the rule is an error at the label column listing the allowed values."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEADER + ROW_A + ROW_B + f"41,70.2,168,118,90,{CANARY}\n"
                  + "41,70.2,168,118,90,2\n")
    err = _data_error(path, synthetic)
    assert [(p.line, p.column, p.column_name) for p in err.problems] == [
        (4, 6, "diabetes"), (5, 6, "diabetes"),
    ]
    assert all(p.message == "label not allowed; allowed: 0, 1" for p in err.problems)
    _assert_no_leak(CANARY, path, caplog, err=err)


@pytest.mark.parametrize("text", ["", "\n\n", "   \n"])
def test_empty_file(tmp_path: Path, synthetic: Schema, text: str) -> None:
    """An empty (or whitespace-only) file is an error at line 1, column 1."""
    path = _write(tmp_path, text)
    p = _only(_data_error(path, synthetic))
    assert (p.line, p.column) == (1, 1)
    assert "empty" in p.message


def test_header_only(tmp_path: Path, synthetic: Schema) -> None:
    """A header without data rows is an error: no rows with a label."""
    path = _write(tmp_path, HEADER)
    p = _only(_data_error(path, synthetic))
    assert p.line == 2
    assert "no data rows" in p.message


def test_only_unlabelled_rows(tmp_path: Path, synthetic: Schema) -> None:
    """Rows that all lack a label leave nothing usable: an error."""
    path = _write(tmp_path, HEADER + "50,94.5,182,134,87,\n")
    p = _only(_data_error(path, synthetic))
    assert "no data rows with a label" in p.message


def test_latin1_file_names_line_and_column(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A non-UTF-8 byte is an error at its line and byte column; the text is not repeated."""
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "latin1.csv"
    path.write_bytes((HEADER + ROW_A + "65,79.4,153,131,98,1\n").encode("ascii")
                     + "41,70.2,CANARY\u00e97781,118,90,0\n".encode("latin-1"))
    err = _data_error(path, synthetic)
    p = _only(err)
    # Line 4; "41,70.2," is 8 bytes, "CANARY" 6 more: the byte 0xE9 is the line's 15th.
    assert (p.line, p.column) == (4, 15)
    assert "not valid UTF-8" in p.message
    _assert_no_leak("CANARY", path, caplog, err=err)


def test_field_over_csv_limit_is_a_data_error(tmp_path: Path, synthetic: Schema) -> None:
    """A field too long for the csv module is a located DataError, not a csv.Error."""
    path = _write(tmp_path, HEADER + ROW_A + "65," + "9" * 200_000 + ",153,131,98,1\n")
    err = _data_error(path, synthetic)
    p = _only(err)
    assert p.line == 3
    assert "cannot be read as CSV" in p.message
    assert "9999" not in str(err)


def test_file_not_found(tmp_path: Path, synthetic: Schema) -> None:
    """A missing file is a DataError naming the path."""
    path = tmp_path / "nowhere.csv"
    p = _only(_data_error(path, synthetic))
    assert p.path == str(path)
    assert p.message == "file not found"


def test_many_problems_are_capped_in_the_message(tmp_path: Path, synthetic: Schema) -> None:
    """Dozens of different bad cells are all in ``problems``; the message lists the first 20."""
    bad = [f"{CANARY},94.5,182,134,87,0\n", f"50,{CANARY},182,134,87,0\n"]
    rows = "".join(bad[i % 2] for i in range(30))
    path = _write(tmp_path, HEADER + rows)
    err = _data_error(path, synthetic)
    assert len(err.problems) == 30
    assert "... and 10 more problem(s)" in str(err)
    assert CANARY not in str(err)


def test_the_same_problem_on_following_lines_is_one_line(
    tmp_path: Path, synthetic: Schema
) -> None:
    """100 rows with the same defect: one line with the count and the last line."""
    path = _write(tmp_path, HEADER + "".join(f"{CANARY},94.5,182,134,87,0\n"
                                             for _ in range(100)))
    err = _data_error(path, synthetic)
    assert len(err.problems) == 100
    (line,) = err.lines
    assert line.startswith(f"{path}:2:1 (column 'age'): not a number")
    assert line.endswith("(the same on 99 more line(s), up to line 101)")


def test_a_file_of_another_schema_is_said_to_be_one(tmp_path: Path, heart: Schema) -> None:
    """Every row with the wrong field count: the hint asks whether the schema is the right one."""
    path = _write(tmp_path, HEADER + ROW_A + ROW_B)
    err = _data_error(path, heart, ())
    assert len(err.lines) == 1 and "is it the schema this file was exported for" in err.hint


def test_locations_without_a_line_or_column_say_less(tmp_path: Path, synthetic: Schema) -> None:
    """A missing file is "path: ...", a missing column "path:1 (column ...)": never ":0"."""
    err = _data_error(tmp_path / "nowhere.csv", synthetic)
    assert str(err.problems[0]).startswith(f"{tmp_path / 'nowhere.csv'}: file not found")
    path = _write(tmp_path, "weight,height,systolic_bp,glucose,diabetes\n" + "94.5,182,1,87,0\n")
    err = _data_error(path, synthetic)
    assert str(err.problems[0]) == (f"{path}:1 (column 'age'): required column is "
                                    "missing from the header")


def test_a_quoted_field_over_two_lines_is_located_where_it_starts(
    tmp_path: Path, synthetic: Schema
) -> None:
    """A record spanning lines 3-4 is reported at line 3."""
    path = _write(tmp_path, HEADER + ROW_A + '"6\n5",79.4,153,131,98,1\n' + ROW_C)
    err = _data_error(path, synthetic)
    assert [(p.line, p.column) for p in err.problems] == [(3, 1)]


def test_a_label_given_with_new_patients_must_be_valid(tmp_path: Path, synthetic: Schema) -> None:
    """Scoring: the label may be absent or empty, but a value that is no label is an error."""
    path = _write(tmp_path, HEADER + ROW_A + "65,79.4,153,131,98,\n" + "41,70,168,118,90,7\n")
    with pytest.raises(DataError) as info:
        read_site_data(path, synthetic, ("glucose",), labelled=False)
    assert [(p.line, p.column) for p in info.value.problems] == [(4, 6)]


# ------------------------------------------------------------------ heart format


def test_heart_unknown_category_lists_allowed_not_value(
    tmp_path: Path, heart: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A cp of 57 is an error at column 3 naming cp and its categories, never the 57."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEART_OK + "63,1,57,145,233,1,2,150,0,2.3,3,0,6,0\n", "x.data")
    err = _data_error(path, heart, ())
    p = _only(err)
    assert (p.line, p.column, p.column_name) == (2, 3, "cp")
    assert p.message == "unknown category; allowed: 1, 2, 3, 4"
    _assert_no_leak("57", path, caplog, err=err)


def test_heart_binary_feature_must_be_0_or_1(
    tmp_path: Path, heart: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """A binary column holding another number is an error naming the column, not the value."""
    caplog.set_level(logging.DEBUG)
    path = _write(tmp_path, HEART_OK + "63,83,1,145,233,1,2,150,0,2.3,3,0,6,0\n", "x.data")
    err = _data_error(path, heart, ())
    p = _only(err)
    assert (p.line, p.column, p.column_name) == (2, 2, "sex")
    assert "0 or 1" in p.message
    _assert_no_leak("83", path, caplog, err=err)


def test_heart_string_values_and_codes(tmp_path: Path, heart: Schema) -> None:
    """Heart rows read "?" as missing, chol 0 as coded missing and categories as indices."""
    text = HEART_OK + "54,0,4,?,0,0,0,140,1,0.0,?,?,?,2\n"
    path = _write(tmp_path, text, "x.data")
    data = read_site_data(path, heart, ["slope", "ca", "thal"])
    assert data.n_rows == 2
    assert list(data.label) == [0, 1]
    first = data.features.iloc[0]
    assert (first["cp"], first["restecg"], first["slope"], first["thal"]) == (0.0, 2.0, 2.0, 1.0)
    assert data.features["cp"].iloc[1] == 3.0
    chol = data.summary["chol"]
    assert (chol.missing, chol.missing_coded) == (1, 1)
    assert not data.marked_missing["chol"].iloc[1]
    assert data.marked_missing["trestbps"].iloc[1]
    assert data.summary["thal"].missing == 1


# ------------------------------------------------------------------ real UCI files


def _heart_file(centre: str) -> Path:
    path = HEART_DIR / f"processed.{centre}.data"
    if not path.is_file():
        pytest.skip(f"UCI heart files not present at {HEART_DIR}")
    return path


@pytest.mark.parametrize(
    ("centre", "rows", "negatives"),
    [("cleveland", 303, 164), ("hungarian", 294, 188), ("switzerland", 123, 8),
     ("va", 200, 51)],
)
def test_uci_heart_row_counts(heart: Schema, centre: str, rows: int, negatives: int) -> None:
    """Each UCI centre reads completely, with its known label balance."""
    data = read_site_data(_heart_file(centre), heart)
    assert data.n_rows == rows
    assert data.label_counts == (negatives, rows - negatives)
    assert data.rows_without_label == 0
    assert data.features.shape == (rows, 10)


def test_uci_switzerland_cholesterol_all_coded_missing(heart: Schema) -> None:
    """Every Switzerland cholesterol is 0, counted as a missing code and not as out of range."""
    data = read_site_data(_heart_file("switzerland"), heart)
    chol = data.summary["chol"]
    assert (chol.missing_coded, chol.missing, chol.out_of_range) == (123, 123, 0)
    assert data.features["chol"].isna().all()
    assert not data.marked_missing["chol"].any()


def test_uci_va_blood_pressure_out_of_range(heart: Schema) -> None:
    """VA's single resting blood pressure of 0 is counted out of range; 49 chol are coded."""
    data = read_site_data(_heart_file("va"), heart)
    bp = data.summary["trestbps"]
    assert bp.out_of_range == 1
    assert data.summary["chol"].missing_coded == 49
    assert any("'trestbps'" in w and "1 value(s) outside" in w for w in data.warnings)


def test_uci_cleveland_with_site_features(heart: Schema) -> None:
    """Cleveland with slope, ca and thal has 13 feature columns; categories become indices."""
    data = read_site_data(_heart_file("cleveland"), heart, ["slope", "ca", "thal"])
    assert data.features.shape == (303, 13)
    assert list(data.features.columns) == [
        "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
        "oldpeak", "slope", "ca", "thal",
    ]
    assert data.site_columns == ("slope", "ca", "thal")
    # First line: 63.0,1.0,1.0,145.0,233.0,1.0,2.0,150.0,0.0,2.3,3.0,0.0,6.0,0
    first = data.features.iloc[0]
    assert (first["cp"], first["restecg"], first["slope"], first["thal"]) == (0.0, 2.0, 2.0, 1.0)
    assert first["age"] == 63.0
    for name in ("cp", "restecg", "slope", "thal"):
        n_categories = len(heart.feature(name).categories)
        seen = set(data.features[name].dropna().unique())
        assert seen <= set(np.arange(n_categories, dtype=float)), name
    assert data.summary["ca"].missing == 4
    assert data.summary["thal"].missing == 2


def test_a_renamed_column_names_the_shared_column_the_header_lacks(
    tmp_path: Path, synthetic: Schema, caplog: pytest.LogCaptureFixture
) -> None:
    """The schema's missing shared column is named (a schema name); the unknown one is not."""
    header = "age,weight,height,sbp_renamed,glucose,diabetes\n"
    path = _write(tmp_path, header + f"50,94.5,182,{CANARY},87,0\n")
    err = _data_error(path, synthetic)
    p = next(p for p in err.problems if "not declared" in p.message)
    assert (p.line, p.column) == (1, 4)
    assert p.message.endswith("absent from the header: systolic_bp (renamed?)")
    assert "check-data" not in str(err) and "sbp_renamed" not in str(err)
    _assert_no_leak(CANARY, path, caplog, err=err)
