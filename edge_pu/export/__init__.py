"""Export an aligned student: merged HF dir, GGUF, GGUF LoRA, ONNX; each verified by a gate.

    from edge_pu.export import export
    report = export((base_dir, adapter_dir), "gguf", out_dir, quant="q8_0")
    # CLI: edge-pu export RUN_DIR --format gguf|onnx|hf|lora-gguf [--quant q8_0]

Importing this package is cheap: torch, transformers, gguf, llama_cpp and onnxruntime load only
when one of the functions below is first used.

Public API (module: what it holds):
    export(source, fmt, out_dir, *, quant=None, prompts=None, n_greedy=None) -> dict  (api)
    merge_adapter(base_dir, adapter_dir, out_dir) -> Path                            (merge)
    dequantize_gguf(gguf_path, out_dir) -> Path                                      (merge)
    write_gguf(model_dir, out_path, quant="f16", *, name=None, nthread=None) -> Path (gguf_writer)
    write_lora_gguf(adapter_dir, base_dir, out_path) -> Path                         (lora_gguf)
    export_onnx(model_dir, out_dir, *, opset=18) -> Path                             (onnx_export)
    write_modelfile(gguf_path, out_path=None) -> Path                                (modelfile)
    check_chat_template(gguf_path, tokenizer) -> dict                                (modelfile)
    THRESHOLDS, run_gate(runner, ref, ...), build_reference(runner, tokenizer, ...)    (verify)
    ExportError, UnsupportedArchitecture, GateFailed                                 (errors)
"""

from __future__ import annotations

import importlib
from typing import Any

from edge_pu.export.errors import ExportError, GateFailed, UnsupportedArchitecture

_LAZY = {
    "export": "api",
    "FORMATS": "api",
    "merge_adapter": "merge",
    "dequantize_gguf": "merge",
    "write_gguf": "gguf_writer",
    "write_lora_gguf": "lora_gguf",
    "export_onnx": "onnx_export",
    "write_modelfile": "modelfile",
    "check_chat_template": "modelfile",
    "THRESHOLDS": "verify",
    "run_gate": "verify",
    "build_reference": "verify",
    "SUPPORTED_ARCHS": "archs",
}

__all__ = ["ExportError", "GateFailed", "UnsupportedArchitecture", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_pu.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"edge_pu.export.{module}"), name)
    globals()[name] = value
    return value
