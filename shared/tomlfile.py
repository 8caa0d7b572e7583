"""TOML files, read one way: every problem, of the file or of a value in it, at file:line:column."""

from __future__ import annotations

import functools
import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import FedadaptError
from shared.files import NotUTF8, decode_utf8

Key = str | int  # a table's key, or the index of an entry of an array of tables
ErrorType = Callable[[str], Exception]


class TomlError(FedadaptError, ValueError):
    """A TOML file that cannot be read; the message names the file, line and column."""


@dataclass(frozen=True)
class TomlFile:
    """A TOML document and where each of its keys is written.

    Attributes
    ----------
    label : str
        The file as messages name it (its path, or what the text came from).
    text : str
        The document's text.
    data : dict
        The parsed document.
    """

    label: str
    text: str
    data: dict[str, Any]

    @functools.cached_property
    def positions(self) -> dict[tuple[Key, ...], tuple[int, int]]:
        """Line and column of each table and key written in the file (found on first use)."""
        return _positions(self.text)

    def position(self, *keys: Key, value: str | None = None) -> tuple[int, int]:
        """The line and column (from 1) of ``keys``; see :meth:`where`."""
        located = next((self.positions[keys[:n]] for n in range(len(keys), 0, -1)
                        if keys[:n] in self.positions), (1, 1))
        if value:
            lines = self.text.split("\n")
            for number in range(located[0], len(lines) + 1):
                column = lines[number - 1].find(value)
                if column >= 0:
                    return number, column + 1
        return located

    def where(self, *keys: Key, value: str | None = None) -> str:
        """``file:line:column`` of a key, to name in a message about its value.

        Parameters
        ----------
        *keys : str or int
            The key's path: ``where("min-rows")``, ``where("label", "column")``,
            ``where("features", 2, "kind")`` (the third ``[[features]]`` table's ``kind``).
            A key that is not written in the file (an inline table's, a default) is placed
            at the nearest table or key above it that is; none at all at 1:1.
        value : str, optional
            Text of the value (an entry of a list): placed where it is first written from the
            key's line on.

        Returns
        -------
        str
            ``label:line:column``.
        """
        line, column = self.position(*keys, value=value)
        return f"{self.label}:{line}:{column}"


def read_toml(path: str | Path, what: str, error: ErrorType = TomlError) -> TomlFile:
    """Read a TOML file; any reason it cannot be read is one error naming where and what to do.

    Parameters
    ----------
    path : str or Path
        The file; messages name it as given.
    what : str
        What the file is, for messages: ``"policy file"``, ``"sites manifest"``.
    error : exception type
        The error raised, built from the message alone (``TomlError`` unless the reader has
        its own).

    Returns
    -------
    TomlFile
        The document, and where its keys are written.

    Raises
    ------
    TomlError
        (or ``error``) when the file does not exist, is a folder or cannot be read, is not
        UTF-8 (line and byte column of the first bad byte) or not valid TOML (line and
        column); a byte-order mark is tolerated.
    """
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder: name the {what} (TOML)") from None
    except OSError as err:
        raise error(f"{path}: cannot read the {what} "
                    f"({err.strerror or type(err).__name__})") from None
    try:
        text = decode_utf8(raw)
    except NotUTF8 as err:
        raise error(f"{path}:{err.line}:{err.column}: not UTF-8 text: save the {what} as "
                    "UTF-8") from None
    return parse_toml(text, str(path), error)


# tomllib's message ends "(at line L, column C)" or "(at end of document)" (Python 3.11 to 3.13).
_AT = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)$", re.DOTALL)


def parse_toml(text: str, label: str, error: ErrorType = TomlError) -> TomlFile:
    """Parse TOML text; see :func:`read_toml`.

    Parameters
    ----------
    text : str
        The document.
    label : str
        What messages call it (a path, ``"<string>"``).
    error : exception type
        The error raised for invalid TOML.

    Returns
    -------
    TomlFile
        The document, and where its keys are written.

    Raises
    ------
    TomlError
        (or ``error``) for invalid TOML, at ``label:line:column``.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        last = text.split("\n")
        line, column = getattr(err, "lineno", None), getattr(err, "colno", None)
        what = str(getattr(err, "msg", err))
        m = _AT.match(what)
        if m:
            what = m.group(1)
            line, column = ((int(m.group(2)), int(m.group(3))) if m.group(2)
                            else (len(last), len(last[-1]) + 1))
        raise error(f"{label}:{line or 1}:{column or 1}: invalid TOML: {what}") from None
    return TomlFile(label, text, data)


# Written by hand: tomllib returns values without their places in the file, and a message
# about a value must name its file:line:column; this scan finds where each key is written.
_BARE = r"[A-Za-z0-9_-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"|\'[^\']*\''
_PART = re.compile(rf"{_BARE}|{_QUOTED}")
_DOTTED = rf"(?:{_BARE}|{_QUOTED})(?:\s*\.\s*(?:{_BARE}|{_QUOTED}))*"
_HEADER = re.compile(rf"(\s*)(\[\[?)\s*({_DOTTED})\s*\]")
_ASSIGN = re.compile(rf"(\s*)({_DOTTED})\s*=")


def _positions(text: str) -> dict[tuple[Key, ...], tuple[int, int]]:
    """Where each table header and key of a valid TOML document is first written.

    A key inside an inline table or an array's entries is not placed (its value is: the
    key it belongs to).
    """
    positions: dict[tuple[Key, ...], tuple[int, int]] = {}
    arrays: dict[tuple[Key, ...], int] = {}  # array of tables -> index of its last entry
    table: tuple[Key, ...] = ()
    open_value = _Scan()  # a value that goes on over the next lines
    for number, line in enumerate(text.split("\n"), 1):
        if open_value.open:
            open_value.feed(line)
            continue
        header = _HEADER.match(line)
        if header:
            parts = _parts(header.group(3))
            path: tuple[Key, ...] = ()
            for part in parts[:-1]:
                path += (part,)
                if path in arrays:
                    path += (arrays[path],)
            path += (parts[-1],)
            at = (number, len(header.group(1)) + 1)
            for n in range(1, len(path) + 1):
                positions.setdefault(path[:n], at)
            if header.group(2) == "[[":
                arrays[path] = arrays.get(path, -1) + 1
                path += (arrays[path],)
                positions.setdefault(path, at)
            table = path
            continue
        assign = _ASSIGN.match(line)
        if assign:
            at = (number, len(assign.group(1)) + 1)
            path = table
            for part in _parts(assign.group(2)):
                path += (part,)
                positions.setdefault(path, at)
            open_value.feed(line[assign.end():])
    return positions


def _parts(dotted: str) -> list[str]:
    """The keys of a dotted key, unquoted."""
    parts = []
    for m in _PART.finditer(dotted):
        part = m.group(0)
        if part.startswith('"'):
            try:
                part = str(json.loads(part))
            except ValueError:  # a TOML escape JSON lacks (\e, \U): close enough to place it
                part = part[1:-1]
        elif part.startswith("'"):
            part = part[1:-1]
        parts.append(part)
    return parts


@dataclass
class _Scan:
    """Where a value is, as its lines go by: inside brackets, or a multi-line string."""

    depth: int = 0
    string: str = ""  # the open multi-line string's delimiter

    @property
    def open(self) -> bool:
        return bool(self.depth or self.string)

    def feed(self, text: str) -> None:
        i = 0
        while i < len(text):
            if self.string:
                end = text.find(self.string, i)
                if end < 0:
                    return
                i, self.string = end + 3, ""
                continue
            c = text[i]
            if c == "#":
                return
            if text.startswith(('"""', "'''"), i):
                self.string, i = text[i:i + 3], i + 3
            elif c in "\"'":
                i = _string_end(text, i)
            else:
                self.depth += (c in "[{") - (c in "]}")
                i += 1


def _string_end(text: str, start: int) -> int:
    """The index after the one-line string opening at ``start``."""
    quote, i = text[start], start + 1
    while i < len(text):
        if quote == '"' and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i + 1
        i += 1
    return i
