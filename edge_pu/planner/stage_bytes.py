"""Each stage's predicted bytes: the terms of edge_pu.planner.torch_terms and .llamacpp added
up for one set of the knobs the planner may turn (`Settings`).

`stages(cfg, shape, settings)` returns the run's stages in order, each a `Stage` of named parts:
load, sample, rank, reference, train (the PU round's DPO or GRPO step) and sft (stage 1), the
framework's baseline excluded (edge_pu.planner.fit adds it). Every sequence is taken at
`student.max_length` tokens (T) with min(max_new_tokens, T-1) completion tokens (C): the worst
case the config allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..model_shape import ModelShape
from .llamacpp import llamacpp_bytes
from .torch_terms import (
    LOGIT_COPIES,
    elem_bytes,
    load_transient,
    logit_rows,
    lora_params,
    saved_per_token_layer,
    shared_prefix_activations,
    weight_bytes,
)


@dataclass(frozen=True)
class Stage:
    name: str
    parts: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(b for _, b in self.parts)


@dataclass(frozen=True)
class Settings:
    """The knobs the planner may turn."""

    max_length: int
    micro_batch: int
    gradient_checkpointing: bool
    rank_batch: int
    k_chunk: int


def stages(cfg: RunConfig, s: ModelShape, st: Settings) -> list[Stage]:
    """Predicted bytes of each stage, runtime excluded, for the settings `st`."""
    e, T = elem_bytes(cfg.student.dtype), st.max_length
    C = max(1, min(cfg.sampling.max_new_tokens, T - 1))
    h, i, L = s.hidden, s.intermediate, s.layers
    w = ("weights", weight_bytes(s, cfg.student.dtype, cfg.student.quant))
    n_lora = lora_params(s, cfg.lora.target_modules, cfg.lora.r)
    lora = ("LoRA params+grads+AdamW", 16 * n_lora)
    out = [Stage("load", (w, ("load transient", load_transient(cfg, s))))]

    if cfg.sampling.engine == "llama-cpp":  # llama.cpp samples; torch holds weights + adapter
        cpp = (("llama.cpp sampler (GGUF, LoRA, KV)", llamacpp_bytes(cfg, s, T, C)),)
        out.append(Stage("sample", (w, lora, *cpp)))
    else:
        cpp = ()
        kv = 2 * L * st.k_chunk * T * s.kv_dim * e
        out.append(Stage("sample", (w, lora, (f"KV cache {st.k_chunk} rows x {T}", kv),
                                    ("prefill logits", (T - C) * s.vocab * e),
                                    ("cache regrowth", kv // (2 * L)),
                                    ("decode step", st.k_chunk * ((3 * h + 3 * i) * e
                                                                  + 24 * s.vocab)))))
    R = st.rank_batch
    scoring = (w, lora, *cpp, ("final hidden states", R * T * h * e))
    layer = R * T * ((3 * h + 3 * i) * e + T * e)  # one layer's working set, mask included
    chunk = logit_rows(s, R * C) * s.vocab * (8 + (0 if e == 4 else 2))
    if cfg.ranker.engine == "llama-cpp" and cfg.ranker.mode in ("judge", "likelihood",
                                                                "recall"):
        # the scoring passes run in the sampler's llama.cpp model, counted in `cpp` already
        out.append(Stage("rank", (w, lora, *cpp)))
    elif cfg.ranker.mode == "judge":
        out.append(Stage("rank", (*scoring, ("max(layer, next-token logits)",
                                             max(layer, R * s.vocab * 8)))))
    elif cfg.ranker.mode == "likelihood":
        out.append(Stage("rank", (*scoring, ("max(layer, logits chunk)", max(layer, chunk)))))
    elif cfg.ranker.mode == "recall":  # each row scores the anchor after prompt + draft
        A = max(1, min(cfg.teacher.max_tokens + 1, T - 1))
        chunk_a = logit_rows(s, R * A) * s.vocab * (8 + (0 if e == 4 else 2))
        out.append(Stage("rank", (*scoring, ("max(layer, logits chunk)",
                                             max(layer, chunk_a)))))
    out.append(Stage("reference", (*scoring, ("max(layer, logits chunk)",
                                              max(layer, chunk)))))

    group = cfg.sampling.k + (1 if cfg.train.anchor == "positive" else 0)  # K + the anchor
    units = st.micro_batch
    rows = units * (2 if cfg.train.algorithm == "dpo" else group)
    out.append(_train_stage("train", cfg, s, st, (w, lora, *cpp), units, rows, C))
    if cfg.sft.enabled:  # stage 1: micro_batch distinct prompts, each with its whole anchor
        A = max(1, min(cfg.teacher.max_tokens + 1, T - 1))
        out.append(_train_stage("sft", cfg, s, st, (w, lora), cfg.sft.micro_batch,
                                cfg.sft.micro_batch, A))
    return out


def _train_stage(name: str, cfg: RunConfig, s: ModelShape, st: Settings,
                 fixed: tuple[tuple[str, int], ...], units: int, rows: int, C: int) -> Stage:
    """One optimizer step's peak: `units` prompts (each run once) and `rows` completions of
    up to C tokens."""
    e, T = elem_bytes(cfg.student.dtype), st.max_length
    h, i, L = s.hidden, s.intermediate, s.layers
    per_layer = saved_per_token_layer(s, cfg.lora.target_modules, cfg.lora.r, e, T)
    head = rows * T * 4 * h + rows * C * h * e  # final norm input; completion hidden states
    logits = LOGIT_COPIES * 4 * logit_rows(s, rows * C) * s.vocab
    if cfg.student.dtype != "float32":
        logits += 2 * logit_rows(s, rows * C) * s.vocab  # the head's bf16 output before .float()
    # Without checkpointing a unit's prompt runs once (T - C tokens) and each row adds C.
    widest = rows * T if st.gradient_checkpointing else max(units * (T - C), rows * C)
    grads = widest * (3 * i + 2 * h) * e
    if cfg.student.quant != "none":  # a 4-bit layer dequantizes its weight for each matmul
        grads += s.largest_linear() * e
    if st.gradient_checkpointing:
        acts = (f"layer inputs {rows} x {T}", rows * T * L * h * e + head)
        trans = ("backward transient", max(logits, rows * T * per_layer + grads))
    else:
        acts = (f"activations {units} prompts x {T - C} + {rows} x {C}",
                shared_prefix_activations(s, cfg.lora.target_modules, cfg.lora.r, e, units,
                                          rows, T - C, C))
        trans = ("backward transient", max(logits, grads))
    return Stage(name, (*fixed, acts, trans))
