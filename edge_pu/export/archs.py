"""The architectures edge_pu can export, read from an HF `config.json`, and what each needs.

    spec = arch_for(config)          # ArchSpec, or UnsupportedArchitecture naming the supported
    hp = hparams(config, spec)       # HParams, or UnsupportedArchitecture for an option we
                                     # cannot reproduce in llama.cpp (RoPE scaling, sliding window)
    w = permute_qk(w, n_head)        # HF q/k rows -> the order llama.cpp's `llama` graph expects

Supported: `llama` (Llama 2/3-style, SmolLM2), `qwen2` (q/k/v biases) and `qwen3` (q/k RMS
norms, explicit head_dim). Everything else is refused rather than written wrong: a file that
loads but computes something else is worse than no file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_pu.export.errors import UnsupportedArchitecture


@dataclass(frozen=True)
class ArchSpec:
    """One supported architecture: HF `model_type` -> llama.cpp and onnxruntime-genai names."""

    model_type: str
    gguf_arch: str  # llama.cpp's `general.architecture`
    permute_qk: bool  # llama.cpp's llama graph wants q/k rows in interleaved-rope order
    genai_type: str  # onnxruntime-genai's `model.type`


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "llama", permute_qk=True, genai_type="llama"),
    "qwen2": ArchSpec("qwen2", "qwen2", permute_qk=False, genai_type="qwen2"),
    "qwen3": ArchSpec("qwen3", "qwen3", permute_qk=False, genai_type="qwen3"),
}
SUPPORTED_ARCHS = tuple(ARCHS)


@dataclass(frozen=True)
class HParams:
    """The numbers llama.cpp's metadata and the ONNX sidecar need, checked for consistency."""

    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool


def arch_for(config: dict[str, Any]) -> ArchSpec:
    """The ArchSpec for an HF config dict; UnsupportedArchitecture if it is not in ARCHS."""
    model_type = str(config.get("model_type", "<missing model_type>"))
    spec = ARCHS.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(model_type, list(ARCHS))
    return spec


def _refuse(spec: ArchSpec, detail: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(spec.model_type, list(ARCHS), detail)


def _rope(config: dict[str, Any], spec: ArchSpec) -> float:
    # transformers >= 5 keeps RoPE settings in `rope_parameters`; 4.x in rope_theta/rope_scaling.
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise _refuse(spec, f"rope_type={rope_type!r}; only plain RoPE is exported")
    if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1:
        raise _refuse(spec, "partial_rotary_factor != 1")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def hparams(config: dict[str, Any], spec: ArchSpec) -> HParams:
    """Read and check the hyper-parameters; refuse options llama.cpp would silently ignore."""
    if config.get("hidden_act", "silu") != "silu":
        raise _refuse(spec, f"hidden_act={config.get('hidden_act')!r}; only silu")
    if config.get("mlp_bias") or (spec.model_type == "llama" and config.get("attention_bias")):
        raise _refuse(spec, "attention_bias/mlp_bias=true is not exported for this model type")
    if config.get("use_sliding_window") or any(
        t != "full_attention" for t in config.get("layer_types") or []
    ):
        raise _refuse(spec, "sliding-window attention layers are not exported")
    n_head = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    if spec.permute_qk and head_dim * n_head != hidden:
        raise _refuse(spec, "llama with head_dim * heads != hidden_size")
    return HParams(
        n_layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        ffn=int(config["intermediate_size"]),
        n_head=n_head,
        n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=head_dim,
        context_length=int(config.get("max_position_embeddings", 2048)),
        rope_theta=_rope(config, spec),
        rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        vocab_size=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k projection rows (or LoRA-B rows) from HF's to llama.cpp's RoPE layout.

    HF Llama rotates dimension i with i + d/2 of each head ("rotate_half"); llama.cpp's llama
    graph rotates adjacent pairs (2i, 2i+1). Interleaving each head's two halves makes both
    compute the same attention. `n_head` is the number of heads the rows hold (KV heads for k).
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(hf_name: str, hp: HParams) -> int | None:
    """Heads to permute over for an HF tensor name, or None if it is not a q/k projection."""
    if ".q_proj." in hf_name:
        return hp.n_head
    if ".k_proj." in hf_name:
        return hp.n_head_kv
    return None
