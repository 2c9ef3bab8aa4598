"""The torch model's bytes: weights, LoRA, saved activations, backward transients, load.

Pure functions of the student's shape (`ModelShape`) and a few config values; edge_pu.planner.
stages adds them up per stage. MLX reuses them as they are (FIXME: not measured on MLX).

The formulas (bytes; e = 4 for float32, 2 for bfloat16; h hidden, I intermediate, L layers,
nh heads of width d, kv = n_kv_heads*d, V vocab, r LoRA rank, N rows in one forward pass):
- weights: every parameter at e; with nf4 the decoder's linear weights take
  0.5 + 1/64 + 4/(64*256) bytes (4-bit codes, 8-bit absmax per 64, fp32 absmax per 256 blocks)
  and embeddings, lm_head and norms stay at e; mlx-affine-4 takes 0.5 + 4/64 (bf16 scale and
  bias per 64) for linears and embeddings. A dtype conversion at load maps the whole file too.
- LoRA: r*(in+out) per targeted module per layer, fp32: 4 (param) + 4 (grad) + 8 (AdamW).
- training activations saved per token per layer (`saved_per_token_layer`): both RMSNorm inputs
  upcast to fp32 (8h), q/k/v after RoPE and the attention output kept by SDPA (2*nh*d + 2*kv)*e
  (k, v repeated to nh heads once a padding mask is passed, which a batch of unequal rows
  always has), the fp32 log-sum-exp (4*nh), the float mask materialized per layer (T*e), the
  MLP's gate output, SiLU output and up output (3*I*e), and each LoRA module's input in fp32
  (shared between modules that read the same tensor when e = 4; peft casts per module else) plus
  its r-wide A output. Eager attention adds its probabilities (2*nh*T*e). A unit's rows share
  their prompt, run once (`shared_prefix_activations`): its T-C tokens count once per unit,
  each row adds its C completion tokens and the copy of the prompt's keys and values that its
  attention keeps. Gradient checkpointing runs every row whole (transformers returns no cache
  then), keeps only each layer's input (h*e) and recomputes one layer at a time.
- backward transients on top: the vocab projection of one chunk (LOGIT_CHUNK_BYTES of fp32
  logits, held as LOGIT_COPIES copies while its gradient is formed) or one layer's gradients
  over the widest pass, N*T*(3I + 2h)*e (whole rows) or max(prompts, completions) tokens,
  whichever is larger.
- no-grad passes (ranking, reference): the final hidden states N*T*h*e plus the larger of one
  layer's working set N*T*((3h + 3I) + T)*e and one logits chunk (two fp32 copies).
- sampling: the KV cache 2*L*K*T*kv*e, the prefill's logits (T-C)*V*e, and one layer's cache
  being regrown by torch.cat.
"""

from __future__ import annotations

from ..config import RunConfig
from ..model_shape import ModelShape

MIB, GIB = 2**20, 2**30
LOGIT_CHUNK_BYTES = 64 * MIB  # = edge_pu.backends.torch_logprobs.LOGIT_CHUNK_BYTES (a test checks)
LOGIT_COPIES = 4  # logits, exp() inside logsumexp, its gradient, the gather's scattered gradient
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
MLX_AFFINE4_BYTES = 0.5 + 4 / 64
LORA_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
              "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in",
              "down_proj": "mlp_mid"}


def elem_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def weight_bytes(s: ModelShape, dtype: str, quant: str) -> int:
    e = elem_bytes(dtype)
    linear, embed = s.linear_params(), s.embed_params()
    rest = s.param_count() - linear - embed
    if quant == "nf4":
        return int(linear * NF4_BYTES) + (embed + rest) * e
    if quant == "mlx-affine-4":
        return int((linear + embed) * MLX_AFFINE4_BYTES) + rest * e
    return s.param_count() * e


def lora_params(s: ModelShape, targets: tuple[str, ...], r: int) -> int:
    dims = s.module_dims()
    return s.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)


def saved_per_token_layer(s: ModelShape, targets: tuple[str, ...], r: int, e: int, T: int,
                          padded: bool = True) -> int:
    """Bytes autograd keeps per token per decoder layer for the backward pass (no checkpoint)."""
    qd = s.heads * s.head_dim
    kv_width = qd if padded else s.kv_dim
    b = 8 * s.hidden + (2 * qd + 2 * kv_width) * e + 4 * s.heads + 3 * s.intermediate * e
    if padded:
        b += T * e
    if s.attn_impl == "eager":
        b += 2 * s.heads * T * e
    width = {"attn_in": s.hidden, "attn_out": qd, "mlp_in": s.hidden, "mlp_mid": s.intermediate}
    known = [t for t in targets if t in LORA_INPUT]
    if e == 4:  # fp32: modules reading the same tensor share it; o_proj reads SDPA's output
        b += sum(4 * width[g] for g in {LORA_INPUT[t] for t in known} if g != "attn_out")
    else:  # peft casts the input to the adapter's fp32 in every module
        b += sum(4 * width[LORA_INPUT[t]] for t in known)
    return b + 4 * r * len(known)


def shared_prefix_activations(s: ModelShape, targets: tuple[str, ...], r: int, e: int,
                              units: int, rows: int, P: int, C: int) -> int:
    """Bytes a training forward without checkpointing saves for backward when `units`
    prompts of P tokens are run once and their `rows` completions of C tokens attend to the
    gathered cache (edge_pu.backends.torch_logprobs `_shared_prefix_logp`): the prompt tokens
    with a P-wide mask, the completion tokens with a (P+C)-wide one, each row's copy of its
    prompt's keys and values that attention keeps (at the query heads' width once a mask is
    passed), and the final norm's fp32 input plus the completion hidden states."""
    L, T = s.layers, P + C
    prompt = units * P * L * saved_per_token_layer(s, targets, r, e, P)
    answer = rows * C * L * saved_per_token_layer(s, targets, r, e, T)
    kept_kv = rows * L * P * 2 * s.heads * s.head_dim * e
    head = (units * P + rows * C) * 4 * s.hidden + rows * C * s.hidden * e
    return prompt + answer + kept_kv + head


def logit_rows(s: ModelShape, tokens: int) -> int:
    return max(1, min(tokens, LOGIT_CHUNK_BYTES // (4 * s.vocab)))


def load_transient(cfg: RunConfig, s: ModelShape) -> int:
    """Bytes mapped or copied while loading, beyond the resident weights."""
    if cfg.student.quant == "nf4":
        return 2 * s.largest_linear() * elem_bytes(s.file_dtype)  # one tensor read, quantized
    if s.gguf:  # the first run's dequantization (edge_pu.quant.student): the file mapped,
        # and transformers' float32 copy of one tensor at a time, the embedding the largest.
        # Measured first-time peaks, Qwen2.5-Coder Q4_K_M: 0.5B 3,792 MiB (this plan 3,817),
        # 1.5B 8,820 MiB (9,161).
        return s.file_bytes + 4 * s.vocab * s.hidden
    if cfg.student.dtype != s.file_dtype:
        return s.file_bytes or s.param_count() * elem_bytes(s.file_dtype)
    return 0
