"""A GGUF file's metadata and tensor table, read without parsing what is not asked for.

`read_header(path)` walks the header of a GGUF file (format v2/v3: magic, version, counts, the
key/value pairs, the tensor infos) in one memory map and returns a `GGUFHeader`: scalar and
string values as Python values, each array as its element type and length only (its values
when the key is named in `arrays=`), and every tensor's name, shape, type and byte offset. The
tensor data is never read.

Why not gguf-py's GGUFReader: it turns every array element into numpy views, so opening the
Qwen2.5 GGUFs (152k tokens and 151k merges in the tokenizer arrays) costs it ~15 s on one Zen 3
core, and a run opened the student's header four times (planner, file type, sampler) before the
first step: ~60 s of a 4-prompt run (cProfile, 2026-12-02). This walk skips those arrays in
~0.1 s.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgePuError

MAGIC = b"GGUF"
# GGUFValueType -> struct code of its fixed-size scalar; 8 = string, 9 = array (gguf-py order).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class Array:
    """An array value: its element type (GGUFValueType), length and, if asked for, values."""
    type: int
    length: int
    values: list[Any] | None = None

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: the fastest-moving dimension first
    type: int  # GGMLQuantizationType
    offset: int  # from the start of the data section

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.type).name.lower()


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]
    tensors: dict[str, Tensor]
    data_offset: int  # where the tensor data starts in the file


class _Cursor:
    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, code: str) -> Any:
        size = struct.calcsize("<" + code)
        if self.pos + size > len(self.buf):
            raise EdgePuError(f"{self.path}: the GGUF header ends early (truncated file?).")
        (value,) = struct.unpack_from("<" + code, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise EdgePuError(f"{self.path}: the GGUF header ends early (truncated file?).")
        raw = bytes(self.buf[self.pos:end])
        self.pos = end
        return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.take("Q")  # read first: `self.pos += self.take(...)` would add to the old pos
        self.pos += n

    def value(self, vtype: int, keep: bool) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise EdgePuError(f"{self.path}: unknown GGUF value type {vtype} in the header.")
        etype, n = self.take("I"), self.take("Q")
        if keep:
            return Array(etype, n, [self.value(etype, True) for _ in range(n)])
        if etype in _SCALARS:
            self.pos += n * struct.calcsize("<" + _SCALARS[etype])
        elif etype == STRING:
            for _ in range(n):
                self.skip_string()
        else:
            for _ in range(n):
                self.value(etype, False)
        return Array(etype, n)


def read_header(path: str | Path, *, arrays: frozenset[str] | set[str] = frozenset()
                ) -> GGUFHeader:
    """The header of the GGUF file at `path`; the values of the array keys in `arrays` too."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != MAGIC:
                raise EdgePuError(f"{path}: not a GGUF file (it does not start with 'GGUF').")
            cur = _Cursor(buf, path)
            cur.pos = 4
            version, n_tensors, n_kv = cur.take("I"), cur.take("Q"), cur.take("Q")
            if version < 2:
                raise EdgePuError(f"{path}: GGUF version {version} is not supported (2 or 3).")
            fields: dict[str, Any] = {}
            for _ in range(n_kv):
                key = cur.string()
                fields[key] = cur.value(cur.take("I"), key in arrays)
            tensors: dict[str, Tensor] = {}
            for _ in range(n_tensors):
                name = cur.string()
                dims = tuple(cur.take("Q") for _ in range(cur.take("I")))
                tensors[name] = Tensor(name, dims, cur.take("I"), cur.take("Q"))
            align = int(fields.get("general.alignment", 32))
            data_offset = -(-cur.pos // align) * align
    except (OSError, ValueError) as exc:
        raise EdgePuError(f"{path}: not a readable GGUF file ({exc}).") from None
    return GGUFHeader(version, fields, tensors, data_offset)


def file_type(path: str | Path) -> int | None:
    """general.file_type of a GGUF (a LlamaFileType value), None when it is not recorded."""
    value = read_header(path).fields.get("general.file_type")
    return None if value is None else int(value)
