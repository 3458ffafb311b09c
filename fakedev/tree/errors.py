"""``TreeError`` and the source locator that finds the line of a TOML value.

tomllib reports line numbers only for syntax errors; for a value that parses
but is wrong (a BAR size that is not a power of two) the loader knows the
*path* of the value (``function[2].capabilities.msi.vectors``) and asks
``SourceLocator`` for the line, found by scanning the text for the table
header and the key. The scan is a heuristic: it finds the line a person would
point at for every layout the documentation shows (array-of-tables headers,
sub-table headers, dotted keys, inline tables on one or several lines).
"""

from __future__ import annotations

import re
from pathlib import Path

PathElem = str | int


class TreeError(ValueError):
    """A device tree that cannot be loaded: names the file, line and field.

    ``str()`` is the whole message, ``"<file>:<line>: <field>: <problem>"``
    (a ValueError, so callers that catch bad values catch it too).
    """

    def __init__(self, file: Path | str, line: int, field: str, problem: str) -> None:
        self.file = Path(file)
        self.line = line
        self.field = field
        self.problem = problem
        where = f"{self.file}:{line}" if line else str(self.file)
        what = f"{field}: " if field else ""
        super().__init__(f"{where}: {what}{problem}")


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?")


def _header_name(line: str) -> tuple[bool, str] | None:
    """(is array-of-tables, dotted name without spaces/quotes) of a header line."""
    m = _HEADER.match(line)
    if not m:
        return None
    name = re.sub(r"\s*\.\s*", ".", m.group(2)).replace('"', "").replace("'", "")
    return m.group(1) == "[[", name


class SourceLocator:
    """Finds the 1-based line of a value given its path in the TOML document."""

    def __init__(self, text: str) -> None:
        # strip comments naively (a '#' inside a string is rare in tree files)
        self.lines = [re.sub(r"#.*$", "", ln) for ln in text.splitlines()]

    def _key_re(self, key: str) -> re.Pattern[str]:
        k = re.escape(key)
        return re.compile(rf"(?:^|[\s{{,.\[])[\"']?{k}[\"']?\s*(?:=|\]|\.)")

    def line_of(self, path: tuple[PathElem, ...]) -> int:
        if not path:
            return 0
        n = len(self.lines)
        start, end = 0, n
        rest = list(path)
        best = 0
        # array-of-tables element: [[name]] headers at top level
        if len(rest) >= 2 and isinstance(rest[0], str) and isinstance(rest[1], int):
            name, idx = rest[0], rest[1]
            heads = [i for i, ln in enumerate(self.lines) if _header_name(ln) == (True, name)]
            if idx < len(heads):
                start = heads[idx]
                best = start + 1
                end = n
                for j in range(start + 1, n):
                    h = _header_name(self.lines[j])
                    if h is None:
                        continue
                    if h == (True, name) or not h[1].startswith(name + "."):
                        end = j
                        break
                rest = rest[2:]
                prefix = name
            else:
                return 0
        else:
            # top-level key: before the first header
            prefix = ""
            for j, ln in enumerate(self.lines):
                if _header_name(ln) is not None:
                    end = j
                    break
            if isinstance(rest[0], str):
                # a top-level table [name] or key = ...
                for j, ln in enumerate(self.lines):
                    h = _header_name(ln)
                    if h is not None and h[1] == rest[0]:
                        start, end, best = j, n, j + 1
                        prefix = rest[0]
                        rest = rest[1:]
                        break
        pos = start
        for elem in rest:
            found = self._find(elem, prefix, pos, end)
            if found is None:
                break
            pos = found
            best = found + 1
            if isinstance(elem, str):
                prefix = f"{prefix}.{elem}" if prefix else elem
        return best

    def _find(self, elem: PathElem, prefix: str, pos: int, end: int) -> int | None:
        if isinstance(elem, int):
            # n-th element of an array: [[prefix]] headers or '{' openings
            heads = [j for j in range(pos, end) if _header_name(self.lines[j]) == (True, prefix)]
            if heads:
                return heads[elem] if elem < len(heads) else None
            count = -1
            for j in range(pos, end):
                count += self.lines[j].count("{")
                if count >= elem:
                    return j
            return None
        # a sub-table header [prefix.elem] or [prefix.elem.x] wins, else a key
        full = f"{prefix}.{elem}" if prefix else elem
        for j in range(pos, end):
            h = _header_name(self.lines[j])
            if h is not None and (h[1] == full or h[1].startswith(full + ".")):
                return j
        key = self._key_re(elem)
        for j in range(pos, end):
            if _header_name(self.lines[j]) is None and key.search(self.lines[j]):
                return j
        return None
