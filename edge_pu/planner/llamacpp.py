"""The llama.cpp engine's bytes (`sampling.engine: llama-cpp`, `ranker.engine: llama-cpp`).

`llamacpp_bytes(cfg, shape, T, C)` is what the sampler holds once it has decoded: the GGUF it
maps (its pages resident once the first decode has read them, so from `sample` on, in every
later stage too: the sampler lives until the run ends), the LoRA as f32, its f16 KV cache of
n_ctx cells (sized as edge_pu.backends.llamacpp_sampler sizes it), the compute buffer, dominated
by the logits of one micro-batch of min(512, n_ctx) tokens (4*V each), and the output buffer
(4*V per sequence). Measured peak RSS on the 0.5B student (18 task prompts, K = 4, T = 160)
against this plan: sample +1%, rank and reference -2% (-6% to -2% at K = 2, T = 80), where the
plan without this term was 20-25% under.

Under `ranker.engine: llama-cpp` the rankers' scoring passes run in this same model, so the rank
stage adds nothing on top of this term (edge_pu.planner.stage_bytes). FIXME: not measured, and a
scoring call may grow two things this term sizes for sampling: the context (re-laid for the
call's rows and cells) and the output buffer, 4*V per position whose logits are read (up to
ranker.batch_size x C, or x the anchor's length for recall, where sampling reads K per prompt).
"""

from __future__ import annotations

from ..config import RunConfig
from ..model_shape import ModelShape
from ..quant.auto import import_as_for
from .torch_terms import lora_params

# = edge_pu.backends.llamacpp_sampler's (a test checks): llama.cpp's sequence limit, the rows
# past which each sequence gets its own KV stream, and a stream's cells; llama-cpp-python's
# default micro-batch (n_ubatch)
LLAMA_MAX_SEQUENCES, LLAMA_UNIFIED_MAX_ROWS, LLAMA_STREAM_CELLS, LLAMA_UBATCH = 256, 32, 256, 512
IMPORT_BYTES = {"q8_0": 34 / 32, "q4_0": 18 / 32, "f16": 2.0}  # per weight, student.import_as


def llamacpp_bytes(cfg: RunConfig, s: ModelShape, T: int, C: int) -> int:
    """Resident bytes of the llama.cpp sampler once it has decoded (see the module docstring)."""
    k = cfg.sampling.k
    import_as = import_as_for(cfg)
    if import_as:
        gguf, kv_e = int(s.param_count() * IMPORT_BYTES.get(import_as, 2.0)), 2
    elif s.gguf:
        gguf, kv_e = s.file_bytes, 2
    else:  # an HF folder is sampled from an f32 copy, with an f32 KV cache
        gguf, kv_e = s.param_count() * 4, 4
    prompts = max(1, min(cfg.sampling.prompt_batch, LLAMA_MAX_SEQUENCES // k))
    if prompts * k <= LLAMA_UNIFIED_MAX_ROWS:
        n_ctx = prompts * (T + (k - 1) * C)
    else:
        n_ctx = prompts * k * LLAMA_STREAM_CELLS
    kv = n_ctx * s.layers * 2 * s.kv_dim * kv_e
    buffers = (min(LLAMA_UBATCH, n_ctx) + prompts * k) * 4 * s.vocab
    return gguf + 4 * lora_params(s, cfg.lora.target_modules, cfg.lora.r) + kv + buffers
