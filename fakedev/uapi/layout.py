"""Fixed little-endian C struct layouts, described as data.

A ``Layout`` names each field with its offset and width, so the model, the
trace decoder and the tests read and write the same bytes the same way.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from typing import Final

from attrs import frozen

_WIDTH: Final = {"B": 1, "b": 1, "H": 2, "h": 2, "I": 4, "i": 4, "Q": 8, "q": 8}


@frozen
class Field:
    name: str
    offset: int
    fmt: str  # one struct code: B b H h I i Q q

    @property
    def size(self) -> int:
        return _WIDTH[self.fmt]

    @property
    def end(self) -> int:
        return self.offset + self.size


class Layout:
    """A C struct: ``Layout("vfio_device_info", 24, [("argsz", "I"), ...])``.

    Fields are listed in order; offsets follow natural alignment unless a field
    is given as ``(name, fmt, offset)``. ``size`` is sizeof(struct) (trailing
    padding and flexible arrays included in the C sense: the array starts at
    ``size``).
    """

    def __init__(self, name: str, size: int, fields: Iterable[tuple[str, str] | tuple[str, str, int]]) -> None:
        self.name = name
        self.size = size
        out: list[Field] = []
        off = 0
        for spec in fields:
            if len(spec) == 3:
                fname, fmt, off = spec
            else:
                fname, fmt = spec
                w = _WIDTH[fmt]
                off = (off + w - 1) // w * w
            f = Field(fname, off, fmt)
            out.append(f)
            off = f.end
        if out and out[-1].end > size:
            raise ValueError(f"{name}: fields end at {out[-1].end} past size {size}")
        self.fields: tuple[Field, ...] = tuple(out)
        self._by_name = {f.name: f for f in out}

    def __repr__(self) -> str:
        return f"<Layout {self.name} size={self.size}>"

    def field(self, name: str) -> Field:
        return self._by_name[name]

    def offsetofend(self, name: str) -> int:
        """``offsetofend(struct, name)``: the kernel's usual ``minsz``."""
        return self._by_name[name].end

    def unpack(self, data: bytes, *, partial: bool = False) -> dict[str, int]:
        """Decode the fields in ``data``.

        With ``partial`` fields that do not fit in ``data`` read as 0 (as
        ``copy_struct_from_user`` zero-fills a short user struct); otherwise
        ``data`` must cover every field.
        """
        vals: dict[str, int] = {}
        for f in self.fields:
            if f.end <= len(data):
                vals[f.name] = struct.unpack_from("<" + f.fmt, data, f.offset)[0]
            elif partial:
                vals[f.name] = 0
            else:
                raise ValueError(f"{self.name}: {len(data)} bytes do not hold {f.name}")
        return vals

    def pack(self, values: Mapping[str, int] | None = None, /, **kw: int) -> bytes:
        """Encode to ``size`` bytes; unnamed fields are 0. Values wrap to width."""
        buf = bytearray(self.size)
        allv = dict(values or {}, **kw)
        for name, v in allv.items():
            f = self._by_name[name]
            mask = (1 << (8 * f.size)) - 1
            struct.pack_into("<" + f.fmt.upper(), buf, f.offset, v & mask)
        return bytes(buf)
