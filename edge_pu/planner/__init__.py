"""Memory planner: predicted peak bytes of each stage of a run, and settings that fit a budget.

    edge-pu plan CONFIG.yaml [--device NAME] [--nproc N] [--set key=value ...]

`plan(cfg, model_config, budget_bytes=...)` reads only the student's shape (config.json, or GGUF
metadata through `read_model_shape`), never its weights, and imports no framework.
`check_fits(cfg, path)` is what `edge-pu run` calls before loading anything.

Each engine's bytes live beside what they model, each module readable alone:
- `torch_terms`: the torch model's weights, LoRA, saved activations, backward transients and load
  (the formulas, derived in its docstring; MLX reuses them, not measured);
- `llamacpp`: the llama.cpp sampler's GGUF, LoRA, KV cache and buffers;
- `stage_bytes`: the stages of a run (load, sample, rank, reference, train, sft), each the sum of
  those terms for one `Settings`;
- `fit`: `plan`, the framework's baseline and the knobs turned until every stage fits;
- `budget`: the memory budget and `check_fits`; `command`: `edge-pu plan` and `--nproc`;
- `allocator`: glibc's mmap threshold, which the CPU predictions assume.

Not counted: the tokenizer and Python-side data. A .gguf student's load is planned as its first
run, the one-time dequantization into the cache (the file plus one float32 tensor beside the
weights); later runs map the cached weights lazily and stay far under it.
"""

from __future__ import annotations

from .allocator import (
    FAST_HEADROOM,
    FAST_MMAP_THRESHOLD,
    TIGHT_MMAP_THRESHOLD,
    cpu_allocator_threshold,
    pin_cpu_allocator,
)
from .budget import budget_for, check_fits, model_config_path, rank_budget
from .command import data_parallel_lines, plan_command
from .fit import RUNTIME_BYTES, Plan, backend_name, model_shape, plan
from .llamacpp import (
    IMPORT_BYTES,
    LLAMA_MAX_SEQUENCES,
    LLAMA_STREAM_CELLS,
    LLAMA_UBATCH,
    LLAMA_UNIFIED_MAX_ROWS,
    llamacpp_bytes,
)
from .stage_bytes import Settings, Stage, stages
from .torch_terms import (
    GIB,
    LOGIT_CHUNK_BYTES,
    LOGIT_COPIES,
    LORA_INPUT,
    MIB,
    MLX_AFFINE4_BYTES,
    NF4_BYTES,
    elem_bytes,
    load_transient,
    logit_rows,
    lora_params,
    saved_per_token_layer,
    shared_prefix_activations,
    weight_bytes,
)

# the names these had when the planner was one module (tests/test_planner.py uses them)
_load_transient, _model_shape = load_transient, model_shape

__all__ = [
    "FAST_HEADROOM", "FAST_MMAP_THRESHOLD", "GIB", "IMPORT_BYTES", "LLAMA_MAX_SEQUENCES",
    "LLAMA_STREAM_CELLS", "LLAMA_UBATCH", "LLAMA_UNIFIED_MAX_ROWS", "LOGIT_CHUNK_BYTES",
    "LOGIT_COPIES", "LORA_INPUT", "MIB", "MLX_AFFINE4_BYTES", "NF4_BYTES", "RUNTIME_BYTES",
    "TIGHT_MMAP_THRESHOLD", "Plan", "Settings", "Stage", "backend_name", "budget_for",
    "check_fits", "cpu_allocator_threshold", "data_parallel_lines", "elem_bytes",
    "llamacpp_bytes", "load_transient", "logit_rows", "lora_params", "model_config_path",
    "model_shape", "pin_cpu_allocator", "plan", "plan_command", "rank_budget",
    "saved_per_token_layer", "shared_prefix_activations", "stages", "weight_bytes",
]
