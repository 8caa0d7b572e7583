"""The only module that reads a site's patient file: parse and validate it against the schema.

Every problem names the file, the line and the column, and never repeats a cell's value:
messages may travel in logs and error replies, and a cell value is patient data.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from shared.errors import FedadaptError
from shared.files import NotUTF8, decode_utf8
from shared.schema import Feature, Schema

if TYPE_CHECKING:
    from _csv import Reader as CsvReader  # the stubs' csv module does not re-export it

log = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    """One defect of a site's file, located without quoting the value."""

    path: str
    line: int
    column: int
    column_name: str
    message: str

    def __str__(self) -> str:
        # file:line:column; a problem of the whole file, or of a whole line, says less.
        where = self.path + (f":{self.line}" if self.line else "") + (
            f":{self.column}" if self.line and self.column else "")
        if self.column_name:
            where += f" (column {self.column_name!r})"
        return f"{where}: {self.message}"


class DataError(FedadaptError, ValueError):
    """A site file that cannot be used. ``problems`` locates each defect; no cell values."""

    def __init__(self, problems: Sequence[Problem], hint: str = "") -> None:
        self.problems = list(problems)
        grouped = _grouped(self.problems)
        self.lines = grouped
        self.hint = hint
        shown = grouped[:MAX_LISTED_PROBLEMS]
        more = len(grouped) - len(shown)
        text = "\n".join(shown)
        if more > 0:
            text += f"\n... and {more} more problem(s) of the same file"
        if hint:
            text += f"\nWhat to do: {hint}"
        super().__init__(text)


def _grouped(problems: Sequence[Problem]) -> list[str]:
    """The problems as lines; a run of the same problem on following lines is one line."""
    lines: list[str] = []
    run: list[Problem] = []

    def flush() -> None:
        if run:
            text = str(run[0])
            if len(run) > 1:
                text += f" (the same on {len(run) - 1} more line(s), up to line {run[-1].line})"
            lines.append(text)

    for p in problems:
        same = run and (p.column, p.column_name, p.message) == (
            run[-1].column, run[-1].column_name, run[-1].message) and p.line > run[-1].line
        if not same:
            flush()
            run = []
        run.append(p)
    flush()
    return lines


@dataclass
class FeatureSummary:
    """Per-feature counts for a site engineer (numbers of cells, never values)."""

    present: bool
    missing: int = 0
    missing_coded: int = 0
    out_of_range: int = 0


@dataclass
class SiteData:
    """A validated site file.

    Attributes
    ----------
    path : Path
        The file read.
    features : pandas.DataFrame
        One float column per used feature (shared, then the site's own), NaN where missing.
        Categorical values are the index of the category in the schema.
    label : numpy.ndarray
        Binary outcome (0/1) per row.
    marked_missing : pandas.DataFrame
        True where the cell itself was empty or a missing marker (not a missing code or an
        out-of-range value); FLamby's protocol drops rows on this.
    line_numbers : numpy.ndarray
        File line of each row, for diagnostics.
    summary : dict
        :class:`FeatureSummary` per schema feature.
    shared_columns, site_columns : tuple of str
        Names of the shared features and of the site's own features, in schema order.
    rows_without_label : int
        Rows skipped because the label was missing.
    warnings : list of str
        Problems that did not stop the file from being used.
    digest : str
        sha256 of the file's bytes: the version of the data a fixed answer belongs to.
    row_digests : list of bytes
        sha256 of each usable row's cells (blanks around them ignored): the row's identity,
        from which a deployed site's keyed split assigns it (``client.split``).
    """

    path: Path
    features: pd.DataFrame
    label: np.ndarray
    marked_missing: pd.DataFrame
    line_numbers: np.ndarray
    summary: dict[str, FeatureSummary]
    shared_columns: tuple[str, ...]
    site_columns: tuple[str, ...]
    rows_without_label: int = 0
    warnings: list[str] = field(default_factory=list)
    digest: str = ""
    row_digests: list[bytes] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        """Number of usable rows."""
        return len(self.label)

    @property
    def label_counts(self) -> tuple[int, int]:
        """Numbers of negative and positive rows."""
        pos = int(self.label.sum())
        return self.n_rows - pos, pos


def read_site_data(
    path: str | Path,
    schema: Schema,
    site_features: Sequence[str] = (),
    labelled: bool = True,
) -> SiteData:
    """Read and validate one site's file.

    Parameters
    ----------
    path : str or Path
        The site's data file.
    schema : Schema
        The data contract the file must follow.
    site_features : sequence of str
        Site-only features this site's correction will use (scope ``site`` in the schema).
    labelled : bool
        False for new patients to score: the label column may be absent or empty, and
        ``label`` is -1 for every row.

    Returns
    -------
    SiteData
        Parsed rows; values out of the valid range or equal to a missing code are missing,
        and counted in ``summary``.

    Raises
    ------
    DataError
        If the file is missing, empty, not UTF-8, lacks a required column, has an unknown
        column, a malformed row, a value of the wrong type, an unknown category or label.
    """
    path = Path(path)
    name = str(path)
    used_site = schema.resolve_site_features(list(site_features))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(
            [Problem(name, 0, 0, "", "file not found")],
            "check the path (at a site: data-file in the SuperNode's --node-config)",
        ) from None
    except OSError as err:
        raise DataError([Problem(name, 0, 0, "", f"cannot be read ({err.strerror})")]) from None
    text = _decode(raw, name)
    if not text.strip():
        raise DataError([Problem(name, 1, 1, "", "the file is empty")],
                        "export the site's patients into this file")

    rows = csv.reader(io.StringIO(text, newline=""), delimiter=schema.file.delimiter)
    problems: list[Problem] = []
    records = _records(rows, name, problems)
    columns, first_line = _columns(records, rows, schema, name, problems, used_site, labelled)
    if problems:
        raise DataError(problems, _COLUMN_HINT)

    position = {c: i for i, c in enumerate(columns)}
    summary = {
        f.name: FeatureSummary(present=f.name in position) for f in schema.features
    }
    warnings = [
        f"{name}: column {f.name!r} is absent: treated as missing for every row"
        for f in schema.features
        if f.name not in position and (f.scope == "shared" or f in used_site)
    ]
    used = [*schema.shared_features, *used_site]
    values: dict[str, list[float]] = {f.name: [] for f in used}
    marked: dict[str, list[bool]] = {f.name: [] for f in used}
    labels: list[int] = []
    lines: list[int] = []
    row_digests: list[bytes] = []
    no_label = 0
    label_pos = position.get(schema.label.column, -1)
    n_cols = len(columns)

    for line, record in records:
        if not any(_strip(cell) for cell in record):
            continue  # blank line
        if len(record) != n_cols:
            problems.append(Problem(
                name, line, min(len(record), n_cols) + 1, "",
                f"row has {len(record)} fields, expected {n_cols}",
            ))
            if len(problems) > 5 * MAX_LISTED_PROBLEMS:
                break
            continue
        label = (
            _label(record[label_pos], schema, name, line, label_pos + 1, problems)
            if labelled else -1
        )
        if not labelled and label_pos >= 0:  # a label given with new patients must be valid
            _label(record[label_pos], schema, name, line, label_pos + 1, problems)
        parsed: dict[str, tuple[float, bool]] = {}
        for f in schema.features:
            if f.name not in position:
                continue
            col = position[f.name]
            # Cells of a row skipped for its missing label are checked but not counted.
            counts = summary[f.name] if label is not None else FeatureSummary(present=True)
            parsed[f.name] = _cell(record[col], f, schema, counts, name, line, col + 1,
                                   problems)
        if label is None:
            no_label += 1
            continue
        labels.append(label)
        lines.append(line)
        row_digests.append(hashlib.sha256(
            "\x1f".join(_strip(cell) for cell in record).encode("utf-8")).digest())
        for f in used:
            value, was_marked = parsed.get(f.name, (math.nan, True))
            values[f.name].append(value)
            marked[f.name].append(was_marked)
        if len(problems) > 5 * MAX_LISTED_PROBLEMS:
            break

    if problems:
        widths = {p.message for p in problems if p.message.startswith("row has ")}
        if len(widths) == 1 and all(p.message in widths for p in problems):
            raise DataError(problems, f"every row has another number of fields than schema "
                            f"{schema.name!r} has columns: is it the schema this file was "
                            "exported for? (`--schema`)")
        raise DataError(problems, "correct these cells in the site's export, then run "
                        "`fedadapt check-data` again")
    if not labels:
        raise DataError(
            [Problem(name, first_line, 1, "", "the file has no data rows with a label"
                     if labelled else "the file has no data rows")],
            "export the site's patients into this file",
        )
    data = SiteData(
        path=path,
        features=pd.DataFrame(values, dtype=float),
        label=np.asarray(labels, dtype=np.int64),
        marked_missing=pd.DataFrame(marked, dtype=bool),
        line_numbers=np.asarray(lines, dtype=np.int64),
        summary=summary,
        shared_columns=tuple(f.name for f in schema.shared_features),
        site_columns=tuple(f.name for f in used_site),
        rows_without_label=no_label,
        warnings=warnings,
        digest=hashlib.sha256(raw).hexdigest(),
        row_digests=row_digests,
    )
    if no_label:
        data.warnings.append(f"{name}: {no_label} row(s) without a label were skipped")
    neg, pos = data.label_counts
    if labelled and (neg == 0 or pos == 0):
        data.warnings.append(
            f"{name}: every row has the same label class; the site can help train the shared "
            "model but cannot fit or evaluate a correction (AUC is undefined)"
        )
    for f in schema.features:
        s = summary[f.name]
        if s.out_of_range:
            data.warnings.append(
                f"{name}: column {f.name!r}: {s.out_of_range} value(s) outside the valid range "
                f"{f.valid_range} became missing"
            )
    for w in data.warnings:
        log.warning("%s", w)
    if labelled:
        log.info("read %s: %d rows (%d negative, %d positive)", name, data.n_rows, neg, pos)
    else:
        log.info("read %s: %d rows to score", name, data.n_rows)
    return data


_COLUMN_HINT = "make the header name the schema's columns, as listed above"


def _decode(raw: bytes, name: str) -> str:
    """The file's text; a DataError at the first byte that is not UTF-8 (never quoting it)."""
    try:
        return decode_utf8(raw)
    except NotUTF8 as err:
        raise DataError(
            [Problem(name, err.line, err.column, "", "the file is not valid UTF-8 text (byte "
                     f"{err.column} of the line)")],
            "save the file as UTF-8 (for example from a spreadsheet: CSV UTF-8)",
        ) from None


def _records(
    rows: CsvReader, name: str, problems: list[Problem]
) -> Iterator[tuple[int, list[str]]]:
    """Yield each record with the line it starts on (a quoted field may span lines).

    A line the csv module cannot parse becomes a problem.
    """
    while True:
        start = rows.line_num + 1
        try:
            record = next(rows)
        except StopIteration:
            return
        except csv.Error as err:
            # csv's messages are fixed texts ("field larger than field limit (131072)"),
            # never the field itself. The rest of the file cannot be trusted: stop here.
            problems.append(Problem(name, start, 1, "",
                                    f"the line cannot be read as CSV ({err})"))
            return
        yield start, record


def _columns(
    records: Iterator[tuple[int, list[str]]], rows: CsvReader, schema: Schema, name: str,
    problems: list[Problem], used_site: tuple[Feature, ...], labelled: bool = True,
) -> tuple[list[str], int]:
    """Return the column names of the file and the line its data starts on."""
    known = {f.name for f in schema.features} | {schema.label.column}
    if not schema.file.header:
        columns = list(schema.file.columns)
        return columns, 1
    header: list[str] = []
    line = 1
    for start, record in records:
        if any(_strip(cell) for cell in record):
            header, line = [_strip(cell) for cell in record], start
            break
    if problems:
        return header, line + 1
    if not known & set(header):
        # No schema column at all: most likely a file exported without its header line, so
        # these "names" are the first patient's values. Never repeat them.
        problems.append(Problem(
            name, line, 1, "",
            f"the first line names none of the columns of schema {schema.name!r}: the file "
            f"needs a header line ({', '.join(_expected_columns(schema))})",
        ))
        return header, line + 1
    unknown = []
    for i, col in enumerate(header, start=1):
        if not col:
            problems.append(Problem(name, line, i, "", "empty column name in the header"))
        elif col not in known:
            unknown.append(i)
        elif header.index(col) != i - 1:
            problems.append(Problem(name, line, i, col, "column appears twice in the header"))
    if unknown:
        # Never repeat an unknown header cell: when the header line is merged with the first
        # patient row (a lost line break) or shifted, its "names" are patient values.
        # The shared columns every site exports (a site-only one may be absent by right).
        absent = [c for c in [*(f.name for f in schema.shared_features), schema.label.column]
                  if c not in header]
        problems.append(Problem(
            name, line, unknown[0], "",
            f"{len(unknown)} column name(s) of the header are not declared by schema "
            f"{schema.name!r} (position {', '.join(map(str, unknown))}; names not shown, "
            "they may be patient values if the header line is damaged); the schema's "
            f"columns are: {', '.join(_expected_columns(schema))}"
            + (f"; absent from the header: {', '.join(absent)} (renamed?)" if absent else ""),
        ))
    if labelled and schema.label.column not in header:
        problems.append(Problem(name, line, 0, schema.label.column,
                                "label column is missing from the header"))
    for f in schema.features:
        # A site-only feature is required only at a site that uses it.
        needed = f.required and (f.scope == "shared" or f in used_site)
        if needed and f.name not in header:
            problems.append(Problem(name, line, 0, f.name,
                                    "required column is missing from the header"))
    return header, line + 1


# The schema's file format: numbers in plain ASCII decimal notation (an optional sign, digits
# with an optional decimal point, an optional exponent). Python's float() also accepts other
# scripts' digits (Arabic-Indic, full-width), underscores and non-ASCII spaces, which a
# hospital export may contain by mistake; they are reported, never silently converted.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
# Only ASCII spaces and tabs around a cell are ignored (str.strip() would also drop U+00A0).
_BLANKS = " \t"


def parse_number(text: str) -> float | None:
    """The value of a cell in the schema's number notation, or None if it is not one.

    Parameters
    ----------
    text : str
        The cell, without surrounding ASCII spaces.

    Returns
    -------
    float or None
        None for anything but plain ASCII decimal notation, and for non-finite values.
    """
    if not _NUMBER.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _strip(cell: str) -> str:
    return cell.strip(_BLANKS)


def _expected_columns(schema: Schema) -> list[str]:
    return [*(f.name for f in schema.features), schema.label.column]


def _matches(value: float, codes: tuple[float | str, ...]) -> bool:
    return any(isinstance(c, float) and c == value for c in codes)


def _cell(
    text: str, f: Feature, schema: Schema, summary: FeatureSummary, name: str, line: int,
    col: int, problems: list[Problem],
) -> tuple[float, bool]:
    """Parse one cell; return (value or NaN, whether the cell itself was marked missing)."""
    cell = _strip(text)
    if cell in schema.file.missing_markers:
        summary.missing += 1
        return math.nan, True
    if f.kind == "categorical" and not f.numeric_categories:
        if cell in f.missing_codes:
            summary.missing += 1
            summary.missing_coded += 1
            return math.nan, False
        if cell not in f.categories:
            problems.append(Problem(name, line, col, f.name, "unknown category; allowed: "
                                    + ", ".join(map(str, f.categories))))
            return math.nan, False
        return float(f.categories.index(cell)), False
    value = parse_number(cell)
    if value is None:
        problems.append(Problem(name, line, col, f.name, f"not a number ({f.kind} feature; "
                                "write plain ASCII decimals such as 63 or 1.5e3)"))
        return math.nan, False
    if _matches(value, f.missing_codes):
        summary.missing += 1
        summary.missing_coded += 1
        return math.nan, False
    if f.kind == "binary":
        if value not in (0.0, 1.0):
            problems.append(Problem(name, line, col, f.name, "binary feature must be 0 or 1"))
            return math.nan, False
        return value, False
    if f.kind == "categorical":
        for i, c in enumerate(f.categories):
            if c == value:
                return float(i), False
        problems.append(Problem(name, line, col, f.name, "unknown category; allowed: "
                                + ", ".join(_fmt(c) for c in f.categories)))
        return math.nan, False
    if f.valid_range is not None and not (f.valid_range[0] <= value <= f.valid_range[1]):
        summary.missing += 1
        summary.out_of_range += 1
        return math.nan, False
    return value, False


def _label(
    text: str, schema: Schema, name: str, line: int, col: int, problems: list[Problem]
) -> int | None:
    cell = _strip(text)
    if cell in schema.file.missing_markers:
        return None
    rule = schema.label
    number = parse_number(cell)
    value: float | str = cell if number is None else number
    if value in rule.negative_values:
        return 0
    if value in rule.positive_values:
        return 1
    allowed = ", ".join(_fmt(v) for v in (*rule.negative_values, *rule.positive_values))
    problems.append(Problem(name, line, col, rule.column, f"label not allowed; allowed: {allowed}"))
    return None


def _fmt(value: float | str) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
