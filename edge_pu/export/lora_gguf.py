"""Write a PEFT LoRA adapter alone as a GGUF LoRA, for llama.cpp's `--lora` / `lora_path`.

    from edge_pu.export import write_lora_gguf
    write_lora_gguf("runs/x/adapter", "runs/x/base-dense", "runs/x/export/adapter.gguf")
    # llama-cli -m base.gguf --lora adapter.gguf   |   Llama(model_path=..., lora_path=...)

Inputs: the PEFT adapter dir (adapter_config.json + adapter_model.safetensors) and the base:
an HF dir or a .gguf file (its config gives the architecture and head counts). Output: a GGUF with
general.type=adapter, adapter.type=lora, adapter.lora.alpha, and for every adapted matrix
`<gguf name>.lora_a` (r x in) and `<gguf name>.lora_b` (out x r), f32, with the base GGUF's
tensor names. For Llama the rows of lora_b of q/k are permuted like the base's q/k weights,
since B's rows are the output rows of the delta B @ A.

llama.cpp scales each delta by alpha / rank (rank read from lora_b), like PEFT's plain LoRA;
rsLoRA (alpha / sqrt(r)) is converted by writing alpha * sqrt(r). Refused with a message:
DoRA, per-module alpha (alpha_pattern), trained biases, modules_to_save, embedding LoRA.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_pu.export import archs
from edge_pu.export.errors import ExportError
from edge_pu.export.gguf_writer import arch_enum, gguf_tensor_name, read_config

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."


def _adapter_alpha(cfg: dict[str, Any], path: Path) -> float:
    refuse = {
        "use_dora": "DoRA",
        "alpha_pattern": "per-module alpha (alpha_pattern)",
        "modules_to_save": "fully trained modules (modules_to_save)",
    }
    for key, what in refuse.items():
        if cfg.get(key):
            raise ExportError(
                f"{path}: {what} cannot be expressed as a GGUF LoRA; export the merged model "
                "(--format gguf) instead."
            )
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("bias", "none") != "none":
        raise ExportError(f"{path}: only plain LoRA with bias='none' is exported as GGUF LoRA.")
    alpha, rank = float(cfg["lora_alpha"]), int(cfg["r"])
    if cfg.get("use_rslora"):
        if cfg.get("rank_pattern"):
            raise ExportError(f"{path}: rsLoRA with a rank_pattern has no single GGUF alpha.")
        return alpha * math.sqrt(rank)  # llama.cpp divides by rank; rsLoRA by sqrt(rank)
    return alpha


def _load_adapter(adapter_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise ExportError(f"{path} not found (a .bin adapter? re-save it with safetensors).")
    try:
        return load_file(str(path))
    except TypeError:  # bf16 weights: numpy has no bfloat16
        import torch
        from safetensors.torch import load_file as load_pt

        return {k: v.to(torch.float32).numpy() for k, v in load_pt(str(path)).items()}


def write_lora_gguf(adapter_dir: str | Path, base_dir: str | Path, out_path: str | Path) -> Path:
    """Write the adapter in `adapter_dir` (trained on `base_dir`) as a GGUF LoRA."""
    adapter_dir, out_path = Path(adapter_dir), Path(out_path)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.exists():
        raise ExportError(f"{cfg_path} not found: not a PEFT adapter dir.")
    alpha = _adapter_alpha(json.loads(cfg_path.read_text()), cfg_path)
    config = read_config(base_dir)
    spec = archs.arch_for(config)
    hp = archs.hparams(config, spec)
    name_map = gguf.get_tensor_name_map(arch_enum(spec.gguf_arch), hp.n_layers)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in _load_adapter(adapter_dir).items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                module = key.removeprefix(_PREFIX).removesuffix(marker)
                pairs.setdefault(module, {})[part] = value.astype(np.float32)
                break
        else:
            raise ExportError(
                f"{adapter_dir}: tensor {key!r} is not a LoRA A/B matrix (embedding LoRA, "
                "a bias or a saved module); it cannot go into a GGUF LoRA."
            )
    if hp.tied_embeddings and "lm_head" in pairs:
        raise ExportError(f"{adapter_dir}: LoRA on a tied lm_head has no output.weight to adapt.")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), spec.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(adapter_dir.name)
    for module in sorted(pairs):
        a, b = pairs[module]["lora_A"], pairs[module]["lora_B"]
        gname = gguf_tensor_name(name_map, module + ".weight", str(adapter_dir))
        heads = archs.qk_heads(module + ".", hp) if spec.permute_qk else None
        if heads is not None:
            b = archs.permute_qk(b, heads)
        writer.add_tensor(gname + ".lora_a", a)
        writer.add_tensor(gname + ".lora_b", b)
    log.info("writing LoRA GGUF %s (%d matrices, alpha %g)", out_path, len(pairs), alpha)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
