"""LoRA for MLX models in PEFT's layout, PEFT-format adapter files, and the dense merge.

`LoRALinear` wraps an `nn.Linear` or an `nn.QuantizedLinear` (the frozen base) with
y = base(x) + (alpha / r) * dropout(x) A^T B^T, A [r, in] and B [out, r] exactly as PEFT stores
`lora_A.weight` / `lora_B.weight`, initialised as PEFT does (A uniform in +-1/sqrt(in), which
is kaiming_uniform(a=sqrt(5)); B = 0). `enabled = False` bypasses the update: the reference
policy of the same weights.

`save_peft(model, dir, ...)` writes adapter_config.json + adapter_model.safetensors with PEFT's
key names (`base_model.model.<module path>.lora_A.weight`), so `peft.PeftModel.from_pretrained`
loads it on the torch side; `load_peft` reads such a dir back (from either backend).
`dense_weights(model)` gives every weight of the model as a plain dense array under its HF name:
quantized layers dequantized and each LoRA delta added, for `merge`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import EdgePuError

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter_model.safetensors"


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        out_dims, in_dims = base.weight.shape
        if isinstance(base, nn.QuantizedLinear):
            in_dims = in_dims * 32 // base.bits
        self.base = base
        self.base.freeze()
        self.scale = alpha / r
        self.enabled = True
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        bound = 1.0 / math.sqrt(in_dims)
        self.lora_a = mx.random.uniform(-bound, bound, (r, in_dims))
        self.lora_b = mx.zeros((out_dims, r))

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        if not self.enabled:
            return y
        h = self.dropout(x) if self.dropout is not None else x
        delta = (h @ self.lora_a.T) @ self.lora_b.T
        return y + (self.scale * delta).astype(y.dtype)

    def base_weight(self) -> mx.array:
        """The base weight as a dense array (dequantized when the base is quantized)."""
        return dense_weight(self.base)

    def merged_weight(self) -> mx.array:
        w = self.base_weight()
        delta = self.scale * (self.lora_b.astype(mx.float32) @ self.lora_a.astype(mx.float32))
        return (w.astype(mx.float32) + delta).astype(w.dtype)


def dense_weight(layer: nn.Module) -> mx.array:
    if isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(layer.weight, layer.scales, layer.get("biases"),
                             group_size=layer.group_size, bits=layer.bits, mode=layer.mode)
    return layer.weight


def add_lora(model: nn.Module, targets: tuple[str, ...], r: int, alpha: float,
             dropout: float) -> list[str]:
    """Freeze the model and wrap every linear layer named in `targets`; returns their paths."""
    model.freeze()
    linear = (nn.Linear, nn.QuantizedLinear)
    found = {path.rsplit(".", 1)[-1] for path, m in model.named_modules()
             if isinstance(m, linear)}
    missing = [t for t in targets if t not in found]
    if missing:
        raise EdgePuError(f"config: lora.target_modules {missing} are not layers of this "
                          f"model; it has {sorted(found)}.")
    wrapped = [(path, LoRALinear(m, r, alpha, dropout)) for path, m in model.named_modules()
               if isinstance(m, linear) and path.rsplit(".", 1)[-1] in targets]
    model.update_modules(tree_unflatten(wrapped))
    return sorted(path for path, _ in wrapped)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield path, m


def peft_state(model: nn.Module) -> dict[str, mx.array]:
    out = {}
    for path, m in lora_layers(model):
        out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_a
        out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_b
    return out


def peft_config(targets: tuple[str, ...], r: int, alpha: float, dropout: float,
                base: str) -> dict[str, Any]:
    """The adapter_config.json fields PEFT needs; it fills the rest with its defaults."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def save_peft(model: nn.Module, path: Path, config: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.astype(mx.float32) for k, v in peft_state(model).items()}
    tmp = path / (ADAPTER_FILE + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), state, metadata={"format": "pt"})
    tmp.replace(path / ADAPTER_FILE)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_peft(model: nn.Module, path: Path) -> None:
    """Set every LoRA layer's A and B from a PEFT adapter dir; shapes and names must match."""
    file = path / ADAPTER_FILE
    if not file.exists():
        raise EdgePuError(f"adapter {path}: no {ADAPTER_FILE} there.")
    cfg_file = path / "adapter_config.json"
    if cfg_file.exists():
        cfg = json.loads(cfg_file.read_text())
        for path_, m in lora_layers(model):
            if abs(cfg.get("lora_alpha", 0) / cfg.get("r", 1) - m.scale) > 1e-9:
                raise EdgePuError(f"adapter {cfg_file}: lora_alpha/r = {cfg.get('lora_alpha')}/"
                                  f"{cfg.get('r')} differs from this model's scale {m.scale} "
                                  f"({path_}); set lora.r and lora.alpha to match.")
            break
    weights = load_arrays(file)
    # PEFT writes keys without the adapter name; some tools keep ".default".
    weights = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."):
               v for k, v in weights.items()}
    expected = peft_state(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise EdgePuError(f"adapter {file}: keys do not match this model's LoRA layers "
                          f"(missing {missing[:3]}, unexpected {extra[:3]}); was it trained "
                          "with the same lora.target_modules on the same architecture?")
    for path_, m in lora_layers(model):
        a = weights[f"{PEFT_PREFIX}{path_}.lora_A.weight"]
        b = weights[f"{PEFT_PREFIX}{path_}.lora_B.weight"]
        if a.shape != m.lora_a.shape or b.shape != m.lora_b.shape:
            raise EdgePuError(f"adapter {file}: {path_} has A {a.shape}, B {b.shape}; this "
                              f"model needs {m.lora_a.shape}, {m.lora_b.shape} (lora.r?).")
        m.lora_a, m.lora_b = a.astype(m.lora_a.dtype), b.astype(m.lora_b.dtype)
    mx.eval(model.parameters())


def dense_weights(model: nn.Module) -> dict[str, mx.array]:
    """Every parameter under its plain HF name: dequantized, LoRA deltas merged in."""
    out: dict[str, mx.array] = {}
    modules = model.named_modules()
    owned = [path for path, m in modules if isinstance(m, LoRALinear)]
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    for path, m in modules:
        if isinstance(m, LoRALinear):
            out[f"{path}.weight"] = m.merged_weight()
            if "bias" in m.base:
                out[f"{path}.bias"] = m.base.bias
        elif isinstance(m, quantized) and not any(path.startswith(p + ".") for p in owned):
            out[f"{path}.weight"] = dense_weight(m)
            if "bias" in m:
                out[f"{path}.bias"] = m.bias
            owned.append(path)
    for key, value in cast(list[tuple[str, mx.array]], tree_flatten(model.parameters())):
        if not any(key.startswith(p + ".") for p in owned):
            out[key] = value
    return out


def load_arrays(file: Path) -> dict[str, mx.array]:
    """A safetensors file as {name: array}."""
    return cast(dict[str, mx.array], mx.load(str(file)))
