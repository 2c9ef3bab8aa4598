"""GGUF tensor types: which type each tensor gets for a `--quant` name, and the K-quant pass.

    qtype = tensor_qtype("blk.0.attn_q.weight", (64, 64), "q4_0")   # gguf.GGMLQuantizationType
    data = encode(array, qtype)                                      # bytes for GGUFWriter
    kquantize(f32_gguf, out_gguf, "q4_k_m")                          # via llama-cpp-python

Names: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1 are written directly with gguf-py's
quantizers; the K-quants (KQUANTS) are produced from an f32 GGUF by llama.cpp's own quantizer
through llama-cpp-python's `llama_model_quantize` binding (no compile step, but the package
must be installed). The per-tensor rules are TYPE_RULES, stated once here and in the report.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from edge_pu.export.errors import ExportError
from edge_pu.gguf_header import file_type as gguf_file_type

# name -> (type of 2-D weights, general.file_type)
DIRECT: dict[str, tuple[T, F]] = {
    "f32": (T.F32, F.ALL_F32),
    "f16": (T.F16, F.MOSTLY_F16),
    "bf16": (T.BF16, F.MOSTLY_BF16),
    "q8_0": (T.Q8_0, F.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, F.MOSTLY_Q4_0),
    "q4_1": (T.Q4_1, F.MOSTLY_Q4_1),
    "q5_0": (T.Q5_0, F.MOSTLY_Q5_0),
    "q5_1": (T.Q5_1, F.MOSTLY_Q5_1),
}
KQUANTS: dict[str, F] = {
    "q2_k": F.MOSTLY_Q2_K,
    "q3_k_s": F.MOSTLY_Q3_K_S,
    "q3_k_m": F.MOSTLY_Q3_K_M,
    "q3_k_l": F.MOSTLY_Q3_K_L,
    "q4_k_s": F.MOSTLY_Q4_K_S,
    "q4_k_m": F.MOSTLY_Q4_K_M,
    "q5_k_s": F.MOSTLY_Q5_K_S,
    "q5_k_m": F.MOSTLY_Q5_K_M,
    "q6_k": F.MOSTLY_Q6_K,
}
_LOW_BIT = {"q4_0", "q4_1", "q5_0", "q5_1"}
_EMBED_OUT = {"token_embd.weight", "output.weight"}

TYPE_RULES = (
    "1-D tensors (norms, biases) stay f32, as llama.cpp keeps them; "
    "in q4_*/q5_* files token_embd/output are q8_0 (llama-quantize likewise keeps the output "
    "matrix at higher precision); a 2-D tensor whose row length is not a multiple of its "
    "type's block size falls back to f16 (as convert_hf_to_gguf does); "
    "K-quants are chosen per tensor by llama.cpp's quantizer from an f32 file."
)


def check_quant(quant: str) -> str:
    """Normalise a quant name ('Q8_0' -> 'q8_0'); ExportError listing the known ones."""
    name = quant.lower().removeprefix("gguf:")
    if name not in DIRECT and name not in KQUANTS:
        raise ExportError(
            f"unknown GGUF quant {quant!r}: use one of {', '.join([*DIRECT, *KQUANTS])}."
        )
    return name


def tensor_qtype(gguf_name: str, shape: tuple[int, ...], quant: str) -> T:
    """The type a tensor of this GGUF name and (numpy) shape gets in a `quant` file."""
    if len(shape) < 2:
        return T.F32
    qtype = DIRECT[quant][0]
    if quant in _LOW_BIT and gguf_name in _EMBED_OUT:
        qtype = T.Q8_0
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block:
        return T.F16
    return qtype


def encode(array, qtype: T):
    """The array encoded as `qtype` (float arrays for f32/f16, packed uint8 otherwise)."""
    return gguf.quants.quantize(array.astype("float32", copy=False), qtype)


def file_type(quant: str) -> F:
    return DIRECT[quant][1] if quant in DIRECT else KQUANTS[quant]


def file_quant(path: str | Path) -> str:
    """The quant name of an existing GGUF (general.file_type), e.g. 'q4_1' for a Q4_1 file."""
    value = gguf_file_type(path)
    if value is None:
        return "f32"
    name = F(value).name.lower()
    return "f32" if name == "all_f32" else name.removeprefix("mostly_")


def kquantize(src: str | Path, dst: str | Path, quant: str, nthread: int | None = None) -> Path:
    """Quantize an f32/f16 GGUF to a K-quant with llama.cpp's quantizer (llama-cpp-python)."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ExportError(
            f"--quant {quant} needs llama.cpp's quantizer: pip install 'edge-pu[gguf]' "
            "(llama-cpp-python), or pick a direct type: " + ", ".join(DIRECT)
        ) from exc
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(KQUANTS[quant])
    params.nthread = nthread or min(4, os.cpu_count() or 1)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama_model_quantize({src} -> {dst}, {quant}) failed with code {rc}.")
    return Path(dst)
