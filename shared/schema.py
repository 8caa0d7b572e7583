"""The data contract: a feature schema read from TOML; built-ins ``synthetic`` and ``heart``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from shared.errors import FedadaptError
from shared.tomlfile import TomlFile, parse_toml, read_toml

Kind = Literal["numeric", "binary", "categorical"]
Scope = Literal["shared", "site"]
Category = float | str

BUILTIN_DIR = Path(__file__).parent / "schemas"
BUILTINS = ("synthetic", "heart")

_KINDS = ("numeric", "binary", "categorical")
_SCOPES = ("shared", "site")
_FEATURE_KEYS = {
    "name", "kind", "unit", "range", "categories", "missing_codes", "scope", "required",
    "description",
}


class SchemaError(FedadaptError, ValueError):
    """A schema file that cannot be used; the message lists every problem found."""


@dataclass(frozen=True)
class Feature:
    """One input column of a site's file.

    Parameters
    ----------
    name : str
        Column name.
    kind : {"numeric", "binary", "categorical"}
        How values are read: numbers, 0/1, or one of ``categories``.
    unit : str
        Unit of measurement, for people (``"mmHg"``).
    valid_range : tuple of float, optional
        Inclusive range of plausible values; values outside it become missing and are counted.
    categories : tuple
        Allowed values of a categorical feature (numbers or strings).
    missing_codes : tuple
        Values that mean "not measured" (cholesterol written as 0).
    scope : {"shared", "site"}
        ``shared`` features feed the federated source model; ``site`` features may be used
        only by the private correction of a site that lists them.
    required : bool
        Whether a file without this column is an error (otherwise: a warning and all missing).
    description : str
        Free text.
    """

    name: str
    kind: Kind
    unit: str = ""
    valid_range: tuple[float, float] | None = None
    categories: tuple[Category, ...] = ()
    missing_codes: tuple[Category, ...] = ()
    scope: Scope = "shared"
    required: bool = True
    description: str = ""

    @property
    def numeric_categories(self) -> bool:
        """Whether categories are numbers (matched numerically, so ``1`` equals ``1.0``)."""
        return all(isinstance(c, float) for c in self.categories)


@dataclass(frozen=True)
class LabelRule:
    """How the label column maps to the binary outcome."""

    column: str
    negative_values: tuple[Category, ...]
    positive_values: tuple[Category, ...]


@dataclass(frozen=True)
class FileFormat:
    """How a site's file is read."""

    format: str = "csv"
    header: bool = True
    delimiter: str = ","
    missing_markers: tuple[str, ...] = ("", "NA")
    columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class Schema:
    """A complete data contract: features, label rule and file format."""

    name: str
    version: str
    description: str
    features: tuple[Feature, ...]
    label: LabelRule
    file: FileFormat
    source: str = field(default="", compare=False)

    @property
    def shared_features(self) -> tuple[Feature, ...]:
        """Features every site contributes to the source model, in schema order."""
        return tuple(f for f in self.features if f.scope == "shared")

    @property
    def site_features(self) -> tuple[Feature, ...]:
        """Features a site's private correction may use, in schema order."""
        return tuple(f for f in self.features if f.scope == "site")

    def feature(self, name: str) -> Feature:
        """Return the feature called ``name``; raise ``KeyError`` naming the known ones."""
        for f in self.features:
            if f.name == name:
                return f
        known = ", ".join(f.name for f in self.features)
        raise KeyError(f"schema {self.name!r} has no feature {name!r} (known: {known})")

    def digest(self) -> str:
        """SHA-256 of the schema's content: sites and server check they agree on it."""
        content = asdict(self)
        content.pop("source", None)
        blob = json.dumps(content, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def resolve_site_features(self, names: list[str] | tuple[str, ...]) -> tuple[Feature, ...]:
        """Check a site's list of extra features against the schema and return them.

        Raises
        ------
        SchemaError
            If a name is unknown or names a shared feature.
        """
        problems = []
        out = []
        for name in names:
            try:
                f = self.feature(name)
            except KeyError as err:
                problems.append(str(err.args[0]))
                continue
            if f.scope != "site":
                problems.append(
                    f"{name!r} is a shared feature of schema {self.name!r}; only features with "
                    "scope = \"site\" can be site features"
                )
            out.append(f)
        if problems:
            raise SchemaError("; ".join(problems))
        return tuple(out)


def load_schema(spec: str | Path) -> Schema:
    """Load a built-in schema by name (``"synthetic"``, ``"heart"``) or a TOML file by path.

    Parameters
    ----------
    spec : str or Path
        A built-in name or the path of a schema TOML file.

    Returns
    -------
    Schema
        The parsed and checked schema.

    Raises
    ------
    SchemaError
        If the file is missing or cannot be read, is not UTF-8 or not valid TOML (with its
        line and column), or breaks the schema rules (every problem listed with its line and
        column).
    """
    if isinstance(spec, str) and spec in BUILTINS:
        path = BUILTIN_DIR / f"{spec}.toml"
        source = f"builtin:{spec}"
    else:
        path = Path(spec)
        source = str(path)
        if not path.exists():
            raise SchemaError(
                f"schema {str(spec)!r} is neither a built-in ({', '.join(BUILTINS)}) "
                "nor an existing TOML file"
            )
    return _schema(read_toml(path, "schema file", SchemaError), source)


def parse_schema(text: str, source: str = "<string>") -> Schema:
    """Parse schema TOML text; see :func:`load_schema`.

    Parameters
    ----------
    text : str
        The schema (TOML).
    source : str
        Where it comes from: messages name it, and so does ``Schema.source``.

    Returns
    -------
    Schema
        The parsed and checked schema.

    Raises
    ------
    SchemaError
        For invalid TOML or broken schema rules, at ``source:line:column``.
    """
    return _schema(parse_toml(text, source, SchemaError), source)


def _schema(doc: TomlFile, source: str) -> Schema:
    """The schema a TOML document declares, or one SchemaError listing every problem."""
    raw = doc.data
    problems: list[str] = []
    shape = {"schema": dict, "file": dict, "label": dict, "features": list}
    for key, kind in shape.items():
        if key in raw and not isinstance(raw[key], kind):
            problems.append(f"{doc.where(key)}: '{key}' must be a "
                            f"{'table' if kind is dict else 'list of tables'}")
    if isinstance(raw.get("features"), list) and not all(
        isinstance(f, dict) for f in raw["features"]
    ):
        problems.append(f"{doc.where('features')}: every entry of 'features' must be a "
                        "[[features]] table")
    schema = None if problems else _build(doc, problems)
    if problems or schema is None:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise SchemaError(f"{doc.label}: {len(problems)} problem(s) in the schema:\n{listing}")
    return Schema(**{**schema.__dict__, "source": source})


def _category(value: Any) -> Category:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return str(value)


def _build(doc: TomlFile, problems: list[str]) -> Schema | None:
    raw = doc.data
    head = raw.get("schema", {})
    name = head.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{doc.where('schema', 'name')}: [schema] needs a non-empty string "
                        "'name'")
    features = tuple(
        f for i, spec in enumerate(raw.get("features", []))
        if (f := _build_feature(doc, i, spec, problems)) is not None
    )
    if not features:
        problems.append(f"{doc.where('features')}: the schema declares no [[features]]")
    names = [f.name for f in features]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        second = [i for i, spec in enumerate(raw.get("features", []))
                  if spec.get("name") == dup][1]
        problems.append(f"{doc.where('features', second, 'name')}: feature {dup!r} is "
                        "declared more than once")
    if not any(f.scope == "shared" for f in features):
        problems.append(f"{doc.where('features')}: at least one feature must have scope = "
                        "\"shared\"")

    lab = raw.get("label", {})
    label_col = lab.get("column")
    neg = tuple(_category(v) for v in lab.get("negative_values", []))
    pos = tuple(_category(v) for v in lab.get("positive_values", []))
    if not isinstance(label_col, str) or not label_col:
        problems.append(f"{doc.where('label', 'column')}: [label] needs a string 'column'")
    elif label_col in names:
        problems.append(f"{doc.where('label', 'column')}: label column {label_col!r} is also "
                        "declared as a feature")
    if not neg or not pos:
        empty = "negative_values" if not neg else "positive_values"
        problems.append(f"{doc.where('label', empty)}: [label] needs non-empty "
                        "'negative_values' and 'positive_values'")
    elif set(neg) & set(pos):
        problems.append(f"{doc.where('label', 'positive_values')}: [label] a value cannot be "
                        "both negative and positive")

    fmt = raw.get("file", {})
    file = FileFormat(
        format=str(fmt.get("format", "csv")),
        header=bool(fmt.get("header", True)),
        delimiter=str(fmt.get("delimiter", ",")),
        missing_markers=tuple(str(m) for m in fmt.get("missing_markers", ["", "NA"])),
        columns=tuple(str(c) for c in fmt.get("columns", [])),
    )
    if file.format != "csv":
        problems.append(f"{doc.where('file', 'format')}: [file] format {file.format!r} is not "
                        "supported (only \"csv\")")
    if len(file.delimiter) != 1:
        problems.append(f"{doc.where('file', 'delimiter')}: [file] delimiter must be one "
                        "character")
    if not file.header:
        expected = set(names) | {label_col}
        if not file.columns:
            problems.append(f"{doc.where('file', 'header')}: [file] header = false needs "
                            "'columns', the column names in order")
        elif set(file.columns) != expected:
            missing = sorted(expected - set(file.columns) - {None})
            extra = sorted(set(file.columns) - expected)
            problems.append(
                f"{doc.where('file', 'columns')}: [file] columns must name every feature and "
                "the label exactly once"
                + (f"; missing {missing}" if missing else "")
                + (f"; not declared {extra}" if extra else "")
            )
    if problems:
        return None
    return Schema(
        name=str(name),
        version=str(head.get("version", "1")),
        description=str(head.get("description", "")),
        features=features,
        label=LabelRule(column=str(label_col), negative_values=neg, positive_values=pos),
        file=file,
    )


def _build_feature(
    doc: TomlFile, i: int, spec: dict[str, Any], problems: list[str]
) -> Feature | None:
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{doc.where('features', i)}: [[features]] #{i + 1}: needs a "
                        "non-empty string 'name'")
        return None

    def problem(key: str, text: str) -> None:
        problems.append(f"{doc.where('features', i, key)}: feature {name!r}{text}")

    for key in sorted(set(spec) - _FEATURE_KEYS):
        problem(key, f": unknown key {key!r} (known: {', '.join(sorted(_FEATURE_KEYS))})")
    kind = spec.get("kind")
    if kind not in _KINDS:
        problem("kind", f": kind must be one of {', '.join(_KINDS)}")
        return None
    scope = spec.get("scope", "shared")
    if scope not in _SCOPES:
        problem("scope", ": scope must be \"shared\" or \"site\"")
    rng = spec.get("range")
    valid_range = None
    if rng is not None:
        if (
            not isinstance(rng, list) or len(rng) != 2
            or not all(isinstance(v, int | float) for v in rng) or rng[0] > rng[1]
        ):
            problem("range", ": range must be [low, high] with low <= high")
        else:
            valid_range = (float(rng[0]), float(rng[1]))
    categories = tuple(_category(c) for c in spec.get("categories", []))
    if kind == "categorical" and len(categories) < 2:
        problem("categories", ": a categorical feature needs at least two 'categories'")
    if kind != "categorical" and categories:
        problem("categories", ": only categorical features take 'categories'")
    if len(set(categories)) != len(categories):
        problem("categories", ": categories must be distinct")
    return Feature(
        name=name,
        kind=kind,
        unit=str(spec.get("unit", "")),
        valid_range=valid_range,
        categories=categories,
        missing_codes=tuple(_category(c) for c in spec.get("missing_codes", [])),
        scope=scope,
        required=bool(spec.get("required", True)),
        description=str(spec.get("description", "")),
    )
