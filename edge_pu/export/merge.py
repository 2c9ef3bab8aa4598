"""Merge a PEFT LoRA adapter into the dense fp32 base it was trained on.

    from edge_pu.export import merge_adapter, dequantize_gguf
    base = dequantize_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "runs/x/base-dense")  # if needed
    merged = merge_adapter("runs/x/base-dense", "runs/x/adapter", "runs/x/merged")

Inputs: `base_dir`, an HF dir with dense weights (the base the training saw; when training ran
on a quantized GGUF, pass its dequantized HF dir, or the .gguf file itself, which is
dequantized here the same way), and `adapter_dir`, a PEFT adapter (adapter_config.json +
adapter_model.safetensors). Output: `out_dir` with model.safetensors (fp32), config.json,
generation_config.json, the tokenizer and chat template.

The adapter is never folded into quantized weights: the rounding of a 4-bit grid is coarser
than a typical LoRA update and would erase it. A base whose config carries a
`quantization_config` (bitsandbytes, GPTQ, ...) is refused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from edge_pu.export.errors import ExportError

log = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _load_dense(base: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    if base.is_file() and base.suffix == ".gguf":
        # transformers dequantizes GGUF weights to plain fp32 tensors on load.
        model = AutoModelForCausalLM.from_pretrained(
            base.parent, gguf_file=base.name, dtype=torch.float32
        )
        model.hf_quantizer = None  # weights are dense now; lets save_pretrained write them
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        return model
    cfg_path = base / "config.json"
    if not cfg_path.exists():
        raise ExportError(f"{cfg_path} not found: base must be an HF model dir or a .gguf file.")
    qcfg = json.loads(cfg_path.read_text()).get("quantization_config")
    if qcfg:
        raise ExportError(
            f"{cfg_path}: the base is quantized ({qcfg.get('quant_method', qcfg)}); merging "
            "into quantized weights would round the adapter away. Pass the dense base the "
            "adapter was trained against (for a GGUF base: its dequantized dir or the .gguf)."
        )
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _load_tokenizer(base: Path, adapter_dir: Path | None) -> Any:
    from transformers import AutoTokenizer

    # Training may have saved the tokenizer (maybe with a changed chat template) beside the
    # adapter; that one wins.
    if adapter_dir is not None and all((adapter_dir / f).exists() for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(adapter_dir)
    if base.is_file():
        return AutoTokenizer.from_pretrained(base.parent, gguf_file=base.name)
    return AutoTokenizer.from_pretrained(base)


def dequantize_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a GGUF's weights, dequantized to fp32, and its tokenizer as an HF dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    log.info("dequantizing %s -> %s", gguf_path, out_dir)
    model = _load_dense(gguf_path)
    model.save_pretrained(out_dir)
    _load_tokenizer(gguf_path, None).save_pretrained(out_dir)
    return out_dir


def load_peft(base_dir: str | Path, adapter_dir: str | Path) -> tuple[Any, Any]:
    """(base + adapter as a PeftModel in fp32, tokenizer): the model as training left it."""
    from peft import PeftModel

    base, adapter = Path(base_dir), Path(adapter_dir)
    if not (adapter / "adapter_config.json").exists():
        raise ExportError(f"{adapter}/adapter_config.json not found: not a PEFT adapter dir.")
    model = PeftModel.from_pretrained(_load_dense(base), adapter)
    return model.eval(), _load_tokenizer(base, adapter)


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge `adapter_dir` into the dense `base_dir`; save the merged HF dir to `out_dir`."""
    out = Path(out_dir)
    log.info("merging %s into %s -> %s", adapter_dir, base_dir, out)
    model, tokenizer = load_peft(base_dir, adapter_dir)
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse NaN/inf deltas
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "edge_pu_merge.json").write_text(
        json.dumps({"base": str(base_dir), "adapter": str(adapter_dir)}, indent=2)
    )
    return out
