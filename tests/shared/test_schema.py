"""Tests of shared.schema: the built-in schemas, parsing, checking, digest and site features."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared.schema import BUILTIN_DIR, Schema, SchemaError, load_schema, parse_schema

HEART_COLUMNS = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang",
                 "oldpeak", "slope", "ca", "thal", "num")

USER_SCHEMA = """\
[schema]
name = "clinic"
version = "3"
description = "A user's own contract."

[file]
header = true
delimiter = ";"
missing_markers = ["", "-"]

[label]
column = "outcome"
negative_values = ["no"]
positive_values = ["yes"]

[[features]]
name = "age"
kind = "numeric"
unit = "years"
range = [0, 120]

[[features]]
name = "smoker"
kind = "binary"
required = false

[[features]]
name = "stage"
kind = "categorical"
categories = ["I", "II", "III"]
missing_codes = ["unknown"]
scope = "site"
"""


def _names(features: tuple) -> list[str]:
    return [f.name for f in features]


def test_synthetic_builtin_features() -> None:
    """The synthetic built-in has four shared features, glucose and HbA1c as site features."""
    schema = load_schema("synthetic")
    assert schema.name == "synthetic"
    assert schema.source == "builtin:synthetic"
    assert _names(schema.shared_features) == ["age", "weight", "height", "systolic_bp"]
    assert _names(schema.site_features) == ["glucose", "hba1c"]
    assert schema.feature("systolic_bp").required is False
    assert schema.feature("age").valid_range == (18.0, 100.0)
    assert schema.label.column == "diabetes"
    assert schema.label.negative_values == (0.0,)
    assert schema.label.positive_values == (1.0,)
    assert schema.file.header is True
    assert schema.file.missing_markers == ("", "NA")


def test_heart_builtin_features() -> None:
    """The heart built-in has ten shared features; slope, ca and thal are site scope."""
    schema = load_schema("heart")
    assert schema.name == "heart"
    assert _names(schema.shared_features) == [
        "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak",
    ]
    assert _names(schema.site_features) == ["slope", "ca", "thal"]
    assert schema.file.header is False
    assert schema.file.columns == HEART_COLUMNS
    assert schema.file.missing_markers == ("?", "")
    assert schema.feature("chol").missing_codes == (0.0,)
    assert schema.feature("cp").categories == (1.0, 2.0, 3.0, 4.0)
    assert schema.feature("cp").numeric_categories
    assert schema.label.column == "num"
    assert schema.label.positive_values == (1.0, 2.0, 3.0, 4.0)


def test_builtin_loads_by_path_like_by_name() -> None:
    """Loading a built-in's TOML file by path gives the same content and digest."""
    by_name = load_schema("heart")
    by_path = load_schema(BUILTIN_DIR / "heart.toml")
    assert by_path == by_name
    assert by_path.digest() == by_name.digest()
    assert by_path.source == str(BUILTIN_DIR / "heart.toml")


def test_unknown_schema_name_lists_builtins() -> None:
    """A name that is neither a built-in nor a file says which built-ins exist."""
    with pytest.raises(SchemaError) as info:
        load_schema("no-such-schema")
    assert "synthetic" in str(info.value)
    assert "heart" in str(info.value)


def test_invalid_toml_reports_line_and_column() -> None:
    """A TOML syntax error names the source and the line and column of the defect."""
    text = '[schema]\nname = "x"\nversion = = 2\n'
    with pytest.raises(SchemaError) as info:
        parse_schema(text, source="bad.toml")
    assert re.match(r"bad.toml:3:\d+: invalid TOML: ", str(info.value))


def test_invalid_toml_file_reports_line_and_column(tmp_path: Path) -> None:
    """A schema file with broken TOML is reported with its path, line and column."""
    path = tmp_path / "broken.toml"
    path.write_text('[schema]\nname = "x"\n\n[[features]\nname = "a"\n', encoding="utf-8")
    with pytest.raises(SchemaError) as info:
        load_schema(path)
    assert str(info.value).startswith(f"{path}:4:11: invalid TOML: ")


def test_several_problems_raise_one_error_listing_all() -> None:
    """Every rule broken in one schema is listed in a single SchemaError."""
    text = """\
[schema]
name = "broken"

[file]
header = false

[label]
column = "y"
negative_values = [0]
positive_values = [1]

[[features]]
name = "a"
kind = "integer"

[[features]]
name = "b"
kind = "categorical"

[[features]]
name = "c"
kind = "numeric"

[[features]]
name = "c"
kind = "numeric"

[[features]]
name = "y"
kind = "binary"
"""
    with pytest.raises(SchemaError) as info:
        parse_schema(text, source="broken.toml")
    message = str(info.value)
    assert message.startswith("broken.toml: 5 problem(s) in the schema:")
    assert "feature 'a': kind must be one of numeric, binary, categorical" in message
    assert "feature 'b': a categorical feature needs at least two 'categories'" in message
    assert "feature 'c' is declared more than once" in message
    assert "label column 'y' is also declared as a feature" in message
    assert "header = false needs 'columns'" in message
    assert message.count("\n  - ") == 5
    # Each problem at the line and column of the key at fault (or of its table).
    for where, words in [(":14:1:", "feature 'a': kind"), (":16:1:", "feature 'b': a categ"),
                         (":25:1:", "feature 'c' is declared"), (":8:1:", "label column 'y'"),
                         (":5:1:", "[file] header = false")]:
        assert f"  - broken.toml{where} {words}" in message


def test_unknown_feature_key_is_a_problem() -> None:
    """A misspelt feature key (``rnage``) is reported, with the known keys."""
    text = USER_SCHEMA.replace('range = [0, 120]', 'rnage = [0, 120]')
    with pytest.raises(SchemaError, match=r"feature 'age': unknown key 'rnage'"):
        parse_schema(text)


def test_digest_is_stable_across_loads() -> None:
    """Two loads of a schema (by name or from its text elsewhere) have the same digest."""
    first = load_schema("synthetic").digest()
    second = load_schema("synthetic").digest()
    text = (BUILTIN_DIR / "synthetic.toml").read_text(encoding="utf-8")
    assert first == second == parse_schema(text, source="elsewhere").digest()
    assert re.fullmatch(r"[0-9a-f]{64}", first)


def test_digest_changes_when_a_range_changes() -> None:
    """Changing one feature's valid range changes the digest."""
    text = (BUILTIN_DIR / "synthetic.toml").read_text(encoding="utf-8")
    assert "range = [18, 100]" in text
    changed = parse_schema(text.replace("range = [18, 100]", "range = [18, 101]"))
    assert changed.feature("age").valid_range == (18.0, 101.0)
    assert changed.digest() != load_schema("synthetic").digest()


def test_resolve_site_features_accepts_site_scope() -> None:
    """Site-scope features resolve to their Feature objects, in the order given."""
    schema = load_schema("heart")
    resolved = schema.resolve_site_features(["thal", "slope"])
    assert [f.name for f in resolved] == ["thal", "slope"]
    assert all(f.scope == "site" for f in resolved)
    assert schema.resolve_site_features([]) == ()


def test_resolve_site_features_rejects_unknown_and_shared() -> None:
    """An unknown name and a shared feature are both reported in one SchemaError."""
    schema = load_schema("heart")
    with pytest.raises(SchemaError) as info:
        schema.resolve_site_features(["ca", "cholesterol", "chol"])
    message = str(info.value)
    assert "no feature 'cholesterol'" in message
    assert "'chol' is a shared feature" in message
    assert "'ca'" not in message


def test_user_schema_file_round_trips(tmp_path: Path) -> None:
    """A user's TOML file loads by path with every declared setting."""
    path = tmp_path / "clinic.toml"
    path.write_text(USER_SCHEMA, encoding="utf-8")
    schema = load_schema(path)
    assert isinstance(schema, Schema)
    assert schema.name == "clinic"
    assert schema.version == "3"
    assert schema.source == str(path)
    assert schema.file.delimiter == ";"
    assert schema.file.missing_markers == ("", "-")
    assert _names(schema.shared_features) == ["age", "smoker"]
    assert _names(schema.site_features) == ["stage"]
    assert schema.feature("age").valid_range == (0.0, 120.0)
    assert schema.feature("smoker").required is False
    stage = schema.feature("stage")
    assert stage.categories == ("I", "II", "III")
    assert not stage.numeric_categories
    assert stage.missing_codes == ("unknown",)
    assert schema.label.negative_values == ("no",)
    assert schema.label.positive_values == ("yes",)
    assert load_schema(str(path)) == schema
    assert load_schema(str(path)).digest() == schema.digest()


def test_schema_file_not_utf8(tmp_path: Path) -> None:
    """A schema file that is not UTF-8 is a SchemaError naming the file."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(USER_SCHEMA.replace("A user's", "Caf\u00e9").encode("latin-1"))
    with pytest.raises(SchemaError, match="not UTF-8"):
        load_schema(path)
