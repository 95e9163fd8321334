"""Line numbers of keys in a TOML text, so validation errors can say ``file:line``.

``tomllib`` keeps no positions. Rather than depend on a second TOML parser for error messages only, this scans
the text the way a person reads it: table headers, arrays of tables, dotted keys and one level of inline
tables, skipping the inside of multi-line strings and arrays (property-tested in ``tests/test_policy.py``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*=")
_INLINE_KEY = re.compile(r"[{,]\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")
_STRINGS = re.compile(r"\"\"\"|'''|\"(?:[^\"\\]|\\.)*\"|'[^']*'")


def _split_key(raw: str) -> list[str]:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+", raw)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


def _unclosed_multiline(value: str) -> str | None:
    """The delimiter of a multi-line string that ``value`` (the rest of a line) opens and does not close, or None.

    Strings are read left to right, so a delimiter inside another string (``"'''"``) or after a comment opens
    nothing."""
    pos = 0
    while (m := _STRINGS.search(value, pos)) is not None:
        if "#" in value[pos : m.start()]:
            return None
        token = m.group(0)
        if token not in ('"""', "'''"):
            pos = m.end()
            continue
        close = value.find(token, m.end())
        if close < 0:
            return token
        pos = close + len(token)
    return None


class KeyLines:
    """Line numbers of the keys and tables of a TOML text, keyed by pydantic-style locs.

    tomllib keeps no positions, so this scans the text: table headers, arrays of tables (their index
    becomes part of the path, as in a pydantic loc), dotted keys and one level of inline tables, skipping
    the inside of multi-line strings and arrays. Good enough to point a person at the right line.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[tuple[str | int, ...], int] = {}
        self._arrays: dict[tuple[str | int, ...], int] = {}  # array-of-tables path -> entries so far
        self._scan(text)

    def _resolve(self, keys: list[str]) -> tuple[str | int, ...]:
        path: tuple[str | int, ...] = ()
        for key in keys:
            path = (*path, key)
            if path in self._arrays:
                path = (*path, self._arrays[path] - 1)
        return path

    def _scan(self, text: str) -> None:
        table: tuple[str | int, ...] = ()
        in_string: str | None = None
        depth = 0  # open brackets of a multi-line array value
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            if depth > 0:
                depth += self._bracket_delta(line)
                continue
            header = _HEADER.match(line)
            if header and not _KEY.match(line):
                keys = _split_key(header.group(2))
                if header.group(1) == "[[":
                    parent = self._resolve(keys[:-1])
                    arr = (*parent, keys[-1])
                    self._lines.setdefault(arr, number)
                    self._arrays[arr] = self._arrays.get(arr, 0) + 1
                    table = (*arr, self._arrays[arr] - 1)
                else:
                    table = self._resolve(keys)
                self._lines.setdefault(table, number)
                continue
            key = _KEY.match(line)
            if not key:
                continue
            path = (*table, *_split_key(key.group(1)))
            self._lines.setdefault(path, number)
            value = line[key.end() :]
            in_string = _unclosed_multiline(value)
            if in_string is None:
                stripped = value.strip()
                if stripped.startswith("{"):
                    for inner in _INLINE_KEY.finditer(_STRINGS.sub('""', stripped)):
                        self._lines.setdefault((*path, _split_key(inner.group(1))[0]), number)
                depth = max(0, self._bracket_delta(value))

    @staticmethod
    def _bracket_delta(text: str) -> int:
        bare = _STRINGS.sub("", text).split("#", 1)[0]
        return bare.count("[") + bare.count("{") - bare.count("]") - bare.count("}")

    def line_of(self, loc: Iterable[str | int]) -> int:
        """The line of the longest prefix of ``loc`` that appears in the text (1 for the top level)."""
        path = tuple(p for p in loc if p != "[key]")
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return 1
