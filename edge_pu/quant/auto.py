"""`student.import_as: auto` (the default): re-quantize the student only where it pays.

    choose_import_as("SmolLM2-135M-Instruct.Q4_1.gguf", "llama-cpp", "none")  # -> "q8_0"
    choose_import_as("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "llama-cpp", "none")  # -> ""

The import (edge_pu.quant.imported) exists for one reason: llama.cpp has no batched kernel for
Q4_1 on AVX2, so a Q4_1 student decodes at about the same rate per row whether 4 or 32 rows share
a batch, while q8_0 has one. Measured on SmolLM2-135M (bench/README.md, "Sampling with
`student.import_as: q8_0`", same run, tokens per CPU-second): the Q4_1 file 127.5, the q8_0
import 197.3 (1.55x), and per decode step at 16 rows 122-133 (Q4_1) against 204-225 (q8_0). The
import's own cost is small beside Q4_1's error: next-token agreement with the source 0.973
(Q4_1's own rounding is ~0.69 by the same measure), made once and cached.

So `auto` chooses q8_0 exactly when:
- llama.cpp samples (`sampling.engine: llama-cpp`): with the torch sampler the import would
  change the weights training sees and buy nothing;
- no other quantization chooses the training weights (`student.quant: none`);
- the student is a GGUF whose matrices (2-D tensors, counted by elements) are mostly Q4_1.
Everything else keeps the student's own weights: K-quants (the Qwen Q4_K_M files) batch well
already (the llama.cpp ranker pays 2-3x on them, bench/README.md), an HF folder is written as an
exact f32 GGUF, and q8_0/q4_0/f16 files are already the import's targets. An explicit value
(q8_0, q4_0, f16, or "" to keep the student's own format) always wins.
"""

from __future__ import annotations

from collections import Counter
from math import prod
from pathlib import Path
from typing import Any

from ..errors import EdgePuError
from ..gguf_header import read_header

AUTO = "auto"
SLOW_BATCHED = frozenset({"q4_1"})  # GGUF types without a batched AVX2 kernel (measured)


def matrix_types(path: Path) -> Counter[str]:
    """Elements per tensor type over the GGUF's 2-D (and larger) tensors: its matrices."""
    counts: Counter[str] = Counter()
    for t in read_header(path).tensors.values():
        if len(t.shape) >= 2:
            counts[t.type_name] += prod(t.shape)
    return counts


def choose_import_as(student_path: str, sampling_engine: str, quant: str) -> str:
    """The `student.import_as` that `auto` stands for, for this student and engine."""
    path = Path(student_path).expanduser()
    if sampling_engine != "llama-cpp" or quant != "none":
        return ""
    if not (path.is_file() and path.suffix == ".gguf"):
        return ""
    try:
        counts = matrix_types(path)
    except EdgePuError:
        return ""  # not readable as a GGUF: loading it later gives the clear error
    slow = sum(n for name, n in counts.items() if name in SLOW_BATCHED)
    return "q8_0" if slow * 2 > sum(counts.values()) else ""


def import_as_for(cfg: Any) -> str:
    """A RunConfig's concrete `student.import_as`: build_config resolves `auto` already; a
    RunConfig made directly in code still holds it, and gets the same choice here."""
    value = cfg.student.import_as
    if value != AUTO:
        return value
    return choose_import_as(cfg.student.path, cfg.sampling.engine, cfg.student.quant)
