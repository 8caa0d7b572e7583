"""TOML files read one way: every problem of a file, or of a value in it, at file:line:column."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client.policy import read_policy
from client.site import SiteConfigError, read_manifest
from shared.files import NotUTF8, decode_utf8
from shared.schema import SchemaError, load_schema
from shared.tomlfile import TomlError, parse_toml, read_toml

DOC = '''# a comment
schema = "synthetic"
[file]
  header = false  # [not a table]
columns = [
  "a", "b",  # ]
  { x = 1 },
]
notes = """
fake = "a key inside a string"
"""
[[features]]
name = "a"
kind = "numeric"

[[features]]
name = "b"
"kind" = 'numeric'
range.low = 1
[[features.codes]]
x = 2
[label]
column = "y"
'''


@pytest.mark.parametrize(("keys", "where"), [
    (("schema",), "2:1"),
    (("file",), "3:1"),
    (("file", "header"), "4:3"),
    (("file", "notes"), "9:1"),
    (("fake",), "1:1"),  # inside a string: not a key
    (("features", 0, "name"), "13:1"),
    (("features", 1), "16:1"),
    (("features", 1, "kind"), "18:1"),
    (("features", 1, "range", "low"), "19:1"),
    (("features", 1, "codes", 0, "x"), "21:1"),
    (("label", "column"), "23:1"),
    (("features", 0, "unit"), "12:1"),  # not written: its table
])
def test_a_key_is_placed_where_it_is_written(keys: tuple[Any, ...], where: str) -> None:
    """Tables, arrays of tables, dotted and quoted keys; strings and multi-line values skipped."""
    doc = parse_toml(DOC, "f.toml")
    assert doc.data["features"][1]["codes"][0]["x"] == 2
    assert doc.where(*keys) == f"f.toml:{where}"


def test_a_list_entry_is_placed_from_its_key_on() -> None:
    """``value``: the first place the entry's text is written, from the key's line on."""
    doc = parse_toml(DOC, "f.toml")
    assert doc.where("file", "columns", value='"b"') == "f.toml:6:8"
    assert doc.where("file", "columns", value="absent") == "f.toml:5:1"


def test_a_file_that_cannot_be_read_is_one_error_saying_why(tmp_path: Path) -> None:
    """Not found, a folder, not UTF-8 (line and byte), not TOML (line and column)."""
    with pytest.raises(TomlError, match=r"x.toml: thing not found$"):
        read_toml(tmp_path / "x.toml", "thing")
    with pytest.raises(TomlError, match=r": is a folder: name the thing \(TOML\)$"):
        read_toml(tmp_path, "thing")
    path = tmp_path / "t.toml"
    path.write_bytes(b"\xef\xbb\xbfa = 1\nb = \"caf\xe9\"\n")
    with pytest.raises(TomlError, match=r"t.toml:2:9: not UTF-8 text: save the thing as UTF-8"):
        read_toml(path, "thing")
    path.write_bytes(b"\xef\xbb\xbfa = 1\nb = = 2\n")
    with pytest.raises(TomlError, match=r"t.toml:2:5: invalid TOML: Invalid value$"):
        read_toml(path, "thing")
    path.write_bytes(b"\xef\xbb\xbfa = 1\n")
    assert read_toml(path, "thing").data == {"a": 1}


def test_the_utf8_locator_names_line_and_byte_never_the_bytes() -> None:
    """The first bad byte's line and byte of the line; a byte-order mark is not counted."""
    assert decode_utf8(b"\xef\xbb\xbfok\n") == "ok\n"
    with pytest.raises(NotUTF8) as err:
        decode_utf8(b"\xef\xbb\xbfab\nc\xe9d\n")
    assert (err.value.line, err.value.column) == (2, 2)
    assert str(err.value) == "2:2: not UTF-8 text (byte 2 of the line)"


Reader = Callable[[Path], Any]
READERS: dict[str, tuple[Reader, type[Exception]]] = {
    "policy": (read_policy, Exception),
    "manifest": (read_manifest, SiteConfigError),
    "schema": (load_schema, SchemaError),
}


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("content", "where", "words"), [
    (b"a = 1\nb = [1,\n", ":3:1:", "invalid TOML"),
    (b"# ok\n# caf\xe9\n", ":2:6:", "not UTF-8 text"),
])
def test_every_reader_names_file_line_and_column(
    tmp_path: Path, reader: str, content: bytes, where: str, words: str
) -> None:
    """The policy, the sites manifest and the schema say the same, at the same place."""
    read, error = READERS[reader]
    path = tmp_path / "f.toml"
    path.write_bytes(content)
    with pytest.raises(error) as err:
        read(path)
    assert re.match(rf"{re.escape(str(path.resolve()))}{where} {words}", str(err.value))


def test_a_manifest_s_entry_is_placed_by_line_and_column(tmp_path: Path) -> None:
    """An incomplete entry, or a name twice, at the entry's table or its key."""
    path = tmp_path / "sites.toml"
    path.write_text('schema = "synthetic"\n[[sites]]\nname = "a"\ndata-file = "a.csv"\n'
                    '[[sites]]\n  name = "a"\ndata-file = "b.csv"\n[[sites]]\nname = "c"\n')
    with pytest.raises(SiteConfigError, match=r"sites.toml:6:3: site name 'a' appears twice"):
        read_manifest(path)
    path.write_text('[[sites]]\nname = "a"\ndata-file = "a.csv"\n[[sites]]\nname = "c"\n')
    with pytest.raises(SiteConfigError,
                       match=r"sites.toml:4:1: \[\[sites\]\] #2 needs 'name' and 'data-file'"):
        read_manifest(path)
