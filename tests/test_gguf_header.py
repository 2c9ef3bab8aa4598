"""edge_pu.gguf_header reads back what gguf-py's GGUFWriter wrote: every value type, arrays as
lengths unless asked for, tensor shapes/types/offsets as GGUFReader sees them; a truncated or
foreign file is refused by name."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_pu.errors import EdgePuError
from edge_pu.gguf_header import Array, read_header


def _write(path: Path) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("t.u32", 7)
    w.add_int32("t.i32", -3)
    w.add_uint64("t.u64", 2**40)
    w.add_float32("t.f32", 0.5)
    w.add_float64("t.f64", -1.25)
    w.add_bool("t.bool", True)
    w.add_uint8("t.u8", 255)
    w.add_string("t.str", "héllo")
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.strs", ["a", "bc", ""])
    w.add_uint32("general.file_type", 7)
    w.add_tensor("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    q = gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_values_arrays_and_tensors_match_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(path)
    h = read_header(path, arrays={"t.strs"})
    f = h.fields
    assert (f["t.u32"], f["t.i32"], f["t.u64"], f["t.f32"], f["t.f64"], f["t.bool"],
            f["t.u8"], f["t.str"]) == (7, -3, 2**40, 0.5, -1.25, True, 255, "héllo")
    assert f["general.architecture"] == "llama"
    assert f["t.ints"] == Array(type=gguf.GGUFValueType.INT32, length=3)  # length only
    assert f["t.strs"].values == ["a", "bc", ""]  # asked for
    # a: 2 x 3 f32 (ggml order: 3 fastest); b: 2 rows of one Q8_0 block (64 values, 34 bytes)
    a, b = h.tensors["a"], h.tensors["b"]
    assert (a.shape, a.type_name, a.offset) == ((3, 2), "f32", 0)
    assert (b.shape, b.type_name) == ((64, 2), "q8_0")
    assert b.offset == 32  # 24 bytes of a, padded to the 32-byte alignment
    reader = gguf.GGUFReader(str(path))
    assert {t.name: t.data_offset for t in reader.tensors} == {
        n: h.data_offset + t.offset for n, t in h.tensors.items()}


def test_truncated_and_foreign_files_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    _write(path)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(EdgePuError, match=r"cut\.gguf: the GGUF header ends early"):
        read_header(cut)
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(EdgePuError, match=r"model\.safetensors: not a GGUF file"):
        read_header(other)
