"""``fedadapt check-data``: tell a site engineer whether a file fits the schema, before joining."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.data import DataError, SiteData, read_site_data
from shared.schema import SchemaError, load_schema


@dataclass
class CheckResult:
    """Outcome of checking one file: a summary when usable, the problems otherwise."""

    path: Path
    schema: str
    ok: bool
    rows: int = 0
    negatives: int = 0
    positives: int = 0
    rows_without_label: int = 0
    features: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def check_file(
    path: str | Path, schema: str, site_features: list[str] | None = None
) -> CheckResult:
    """Validate ``path`` against a schema and summarise it (counts only, never values).

    Parameters
    ----------
    path : str or Path
        The site's data file.
    schema : str
        Built-in schema name or schema file.
    site_features : list of str, optional
        Site-only features the site will use.

    Returns
    -------
    CheckResult
        ``ok`` is False when the file cannot be used; ``errors`` then say where and why.
    """
    path = Path(path)
    try:
        sch = load_schema(schema)
        data = read_site_data(path, sch, site_features or [])
    except DataError as err:
        return CheckResult(path, schema, ok=False,
                           errors=err.lines + ([err.hint] if err.hint else []))
    except SchemaError as err:
        return CheckResult(path, schema, ok=False, errors=[str(err)])
    return _summary(path, schema, data)


def _summary(path: Path, schema: str, data: SiteData) -> CheckResult:
    neg, pos = data.label_counts
    used = set(data.shared_columns) | set(data.site_columns)
    features = []
    for name, s in data.summary.items():
        features.append({
            "feature": name,
            "used": name in used,
            "present": s.present,
            "missing": s.missing if s.present else data.n_rows,
            "missing_coded": s.missing_coded,
            "out_of_range": s.out_of_range,
        })
    return CheckResult(
        path, schema, ok=True, rows=data.n_rows, negatives=neg, positives=pos,
        rows_without_label=data.rows_without_label, features=features,
        warnings=list(data.warnings),
    )
