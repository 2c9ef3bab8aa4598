"""`export()`: one call from a trained run to a verified artifact. The CLI's entry point.

    from edge_pu.export import export
    report = export(("runs/x/base", "runs/x/adapter"), "gguf", "runs/x/export", quant="q8_0")
    report = export("runs/x/merged", "onnx", "runs/x/export/onnx")
    # edge-pu export RUN_DIR --format gguf|onnx|hf|lora-gguf [--quant q8_0]

`source` is a merged HF dir, or (base_dir, adapter_dir) with base_dir the dense base the adapter
was trained on (or its .gguf, dequantized on load). Every format is merged -> dense -> written
-> loaded in its runtime -> compared with the merged torch model (verify.py); the report is
written to out_dir/export_report.json and returned, and GateFailed is raised if a check fails.

Formats and what lands in out_dir:
- hf:        the merged HF dir itself; gate: merged model vs base + adapter unmerged (PEFT).
- gguf:      model-<quant>.gguf (default f16) + Modelfile; gate: llama.cpp, + chat template.
             The gate runs llama.cpp's default f16 KV cache, except for f32 files, where an f32
             cache lets it check the weights to 1e-3.
- lora-gguf: adapter-lora.gguf + the base to run it on: base-<quant>.gguf (default f16), or,
             for a .gguf base and no quant, a copy of that file: the adapter then runs on the
             exact weights training saw, and only the LoRA delta stays in f32 (a 4-bit
             re-export of the merged model would round small deltas back onto the grid).
             Gate: llama.cpp with the LoRA applied at load time; thresholds of the base's type.
- onnx:      model.onnx + genai_config.json + tokenizer files (fp32); gate: onnxruntime.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from edge_pu.export.errors import ExportError, GateFailed

log = logging.getLogger(__name__)

FORMATS = ("hf", "gguf", "lora-gguf", "onnx")
Source = str | Path | tuple[str | Path, str | Path]


def _load(model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def export(
    source: Source,
    fmt: str,
    out_dir: str | Path,
    *,
    quant: str | None = None,
    prompts: list[str] | None = None,
    n_greedy: int | None = None,
) -> dict[str, Any]:
    """Export `source` to `fmt` in `out_dir`, run the gate, return the report (see module doc)."""
    from edge_pu.export import merge, verify
    from edge_pu.export.runtimes import TorchRunner

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}.")
    pair = (Path(source[0]), Path(source[1])) if isinstance(source, tuple) else None
    if fmt in ("lora-gguf", "hf") and pair is None:
        raise ExportError(f"{fmt} needs (base_dir, adapter_dir), not the merged dir {source}.")
    if fmt in ("hf", "onnx") and quant not in (None, "f32", "fp32"):
        raise ExportError(f"--quant {quant} does not apply to {fmt}: it is exported in fp32.")
    # lora-gguf on a .gguf base with no --quant: the adapter runs on that very file.
    keep_base = fmt == "lora-gguf" and pair is not None and pair[0].is_file() and quant is None
    if fmt in ("gguf", "lora-gguf") and not keep_base:
        from edge_pu.export.gguf_types import check_quant

        quant = check_quant(quant or "f16")  # fail before the slow steps, not after
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    with ExitStack() as stack:
        if pair is None:
            merged = Path(source)  # type: ignore[arg-type]
        else:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=out)))
            merged = out if fmt == "hf" else scratch / "merged"
            merge.merge_adapter(pair[0], pair[1], merged)

        log.info("reference: the merged torch model on the gate prompts")
        model, tokenizer = _load(merged)
        # hf: the artifact is the merged dir itself, checked against training's PEFT model.
        ref_model = merge.load_peft(*pair)[0] if fmt == "hf" else model  # type: ignore[misc]
        ref = verify.build_reference(TorchRunner(ref_model), tokenizer, prompts, n_greedy or 0)
        del ref_model
        if fmt == "hf":
            artifacts, runner, extra, row = [merged], TorchRunner(model), {}, None
        else:
            del model
            artifacts, runner, extra, row = _write(fmt, pair, merged, out, quant, tokenizer)
        try:
            report = verify.run_gate(
                runner,
                ref,
                fmt=fmt,
                quant=row,
                artifact=artifacts[0],
                extra=extra,
                decode=tokenizer.decode,
            )
            failure = None
        except GateFailed as exc:
            report, failure = exc.report, exc
        finally:
            if hasattr(runner, "close"):
                runner.close()
    report["artifacts"] = [str(a) for a in artifacts]
    report["source"] = [str(p) for p in pair] if pair else str(source)
    report["seconds"] = round(time.time() - started, 2)
    verify.write_report(report, out)
    if failure is not None:
        failure.report = report
        raise failure
    return report


def _write(
    fmt: str,
    pair: tuple[Path, Path] | None,
    merged: Path,
    out: Path,
    quant: str | None,
    tokenizer: Any,
) -> tuple[list[Path], Any, dict[str, Any], str | None]:
    """Write the artifact(s); return them, a runner over them, extra checks, the type row."""
    from edge_pu.export import runtimes

    if fmt == "onnx":
        from edge_pu.export.onnx_export import export_onnx

        export_onnx(merged, out)
        return [out / "model.onnx"], runtimes.OrtRunner(out), {}, None

    from edge_pu.export.gguf_writer import write_gguf
    from edge_pu.export.modelfile import check_chat_template, write_modelfile

    if fmt == "gguf":
        assert quant is not None
        name = pair[1].name if pair else merged.name  # general.name: the adapter's or model's
        path = write_gguf(merged, out / f"model-{quant}.gguf", quant, name=name)
        write_modelfile(path)
        extra = {"chat_template": check_chat_template(path, tokenizer)}
        runner = runtimes.LlamaCppRunner(path, kv_f32=quant == "f32")
        return [path, out / "Modelfile"], runner, extra, quant

    from edge_pu.export.gguf_types import file_quant
    from edge_pu.export.lora_gguf import write_lora_gguf
    from edge_pu.export.merge import dequantize_gguf

    assert pair is not None
    base_dir, adapter_dir = pair
    if quant is None:  # the .gguf base training saw (dequantized), kept byte for byte
        base = out / base_dir.name
        shutil.copy2(base_dir, base)
        quant = file_quant(base)
    else:
        if base_dir.is_file():  # a .gguf base rewritten at --quant from its dense weights
            base_dir = dequantize_gguf(base_dir, merged.parent / "base")
        base = write_gguf(base_dir, out / f"base-{quant}.gguf", quant, name=base_dir.name)
    lora = write_lora_gguf(adapter_dir, pair[0], out / "adapter-lora.gguf")
    extra = {"chat_template": check_chat_template(base, tokenizer)}
    runner = runtimes.LlamaCppRunner(base, lora_path=lora, kv_f32=quant == "f32")
    return [lora, base], runner, extra, quant
