"""The shape of a decoder-only student, read without touching its weights.

`read_model_shape(path)` takes an HF model dir, its config.json, or a .gguf file (whose header
edge_pu.gguf_header walks: the tensor data is never read) and returns a
`ModelShape`: sizes, head counts, tied embeddings, the dtype of the stored weights. The memory
planner (`edge_pu.planner`) computes everything else from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EdgePuError
from .gguf_header import Array, read_header

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16", "fp32": "float32",
          "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False  # lm_head shares the embedding matrix
    qkv_bias: bool = False
    attn_impl: str = "sdpa"
    file_dtype: str = "float32"  # dtype of the stored weights (what loading maps or converts)
    file_bytes: int = 0  # size of the weight files, 0 when unknown
    gguf: bool = False
    arch: str = ""

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear module of one Llama/Qwen2-style decoder layer."""
        h, i, q = self.hidden, self.intermediate, self.heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
                "o_proj": (q, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.module_dims().values())

    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def param_count(self) -> int:
        bias = (self.heads * self.head_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        norms = 2 * self.hidden
        return (self.linear_params() + self.embed_params() + self.layers * (bias + norms)
                + self.hidden)

    def largest_linear(self) -> int:
        return max(a * b for a, b in self.module_dims().values())

    @classmethod
    def from_config(cls, d: dict[str, Any], where: str = "model config") -> ModelShape:
        """From an HF config.json dict (a multimodal config's text_config is used)."""
        if "hidden_size" not in d and isinstance(d.get("text_config"), dict):
            d = {**d["text_config"], "tie_word_embeddings": d.get("tie_word_embeddings")}

        def need(key: str) -> int:
            if not isinstance(d.get(key), int):
                raise EdgePuError(f"{where}: '{key}' is missing or not a whole number; the "
                                  "planner needs it to size the student.")
            return int(d[key])

        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        dtype = str(d.get("dtype") or d.get("torch_dtype") or "float32")
        return cls(vocab=need("vocab_size"), hidden=hidden,
                   intermediate=need("intermediate_size"), layers=need("num_hidden_layers"),
                   heads=heads, kv_heads=int(d.get("num_key_value_heads") or heads),
                   head_dim=int(d.get("head_dim") or hidden // heads),
                   tied=bool(d.get("tie_word_embeddings")),
                   qkv_bias=bool(d.get("attention_bias")) or d.get("model_type") == "qwen2",
                   attn_impl=str(d.get("_attn_implementation") or d.get("attn_implementation")
                                 or "sdpa"),
                   file_dtype=DTYPES.get(dtype, "float32"), arch=str(d.get("model_type", "")))

    @classmethod
    def from_gguf(cls, path: Path) -> ModelShape:
        header = read_header(path)

        def value(key: str) -> Any:
            v = header.fields.get(key)
            return len(v) if isinstance(v, Array) else v

        arch = value("general.architecture")
        if not arch:
            raise EdgePuError(f"{path}: GGUF metadata has no general.architecture.")

        def need(key: str) -> int:
            v = value(f"{arch}.{key}")
            if v is None:
                raise EdgePuError(f"{path}: GGUF metadata has no '{arch}.{key}'; the planner "
                                  "needs it to size the student.")
            return int(v)

        names = set(header.tensors)
        hidden, heads = need("embedding_length"), need("attention.head_count")
        vocab = value(f"{arch}.vocab_size") or value("tokenizer.ggml.tokens")
        if not vocab:
            raise EdgePuError(f"{path}: GGUF metadata gives no vocabulary size.")
        return cls(vocab=int(vocab), hidden=hidden, intermediate=need("feed_forward_length"),
                   layers=need("block_count"), heads=heads,
                   kv_heads=int(value(f"{arch}.attention.head_count_kv") or heads),
                   head_dim=int(value(f"{arch}.attention.key_length") or hidden // heads),
                   tied="output.weight" not in names, qkv_bias="blk.0.attn_q.bias" in names,
                   file_dtype="float32",  # edge_pu dequantizes a GGUF student to float32 once
                   file_bytes=path.stat().st_size, gguf=True, arch=str(arch))


def read_model_shape(path: str | Path) -> ModelShape:
    """Shape of the student at `path`: an HF dir, its config.json, or a .gguf file."""
    path = Path(path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EdgePuError(f"student.path {path}: no such GGUF file.")
        return ModelShape.from_gguf(path)
    config = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgePuError(f"student.path {path}: no config.json to size the model.") from None
    except json.JSONDecodeError as exc:
        raise EdgePuError(f"{config}: invalid JSON ({exc}).") from None
    shape = ModelShape.from_config(data, where=str(config))
    weights = sum(f.stat().st_size for f in config.parent.glob("*.safetensors"))
    return ModelShape(**{**shape.__dict__, "file_bytes": weights})
