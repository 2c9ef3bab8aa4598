"""ONNX export (decoder with KV cache) of tiny Llama and Qwen2, judged by onnxruntime.

The gate's greedy check decodes token by token, feeding the `present.*` outputs back as
`past_key_values.*`, so a broken cache path fails it even when full-prompt logits agree.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edge_pu.export import GateFailed, export

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript")


@pytest.fixture(scope="module")
def exported(
    tiny_llama_dir: Path, tiny_qwen2_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict]]:
    """One export per architecture, shared by the tests below (each takes ~10-30 s)."""
    out = {}
    for arch, model in (("llama", tiny_llama_dir), ("qwen2", tiny_qwen2_dir)):
        target = tmp_path_factory.mktemp(f"onnx-{arch}")
        out[arch] = (target, export(model, "onnx", target))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_onnx_export_passes_the_gate(arch: str, exported: dict[str, tuple[Path, dict]]) -> None:
    out, report = exported[arch]
    assert report["passed"], report["checks"]
    checks = report["checks"]
    assert checks["logits_max_abs"]["value"] < 1e-3
    assert checks["top1_agreement"]["value"] == 1.0 and checks["greedy_match"]["value"] == 1.0
    assert checks["tokenization"]["value"] == 1.0  # tokenizer.json beside the model
    assert json.loads((out / "export_report.json").read_text())["passed"]


def test_genai_config_and_graph_signature(
    exported: dict[str, tuple[Path, dict]], tiny_qwen2_dir: Path
) -> None:
    import onnxruntime as ort

    out, _ = exported["qwen2"]
    model_cfg = json.loads((tiny_qwen2_dir / "config.json").read_text())
    cfg = json.loads((out / "genai_config.json").read_text())["model"]
    assert cfg["type"] == "qwen2" and cfg["eos_token_id"] == model_cfg["eos_token_id"]
    dec = cfg["decoder"]
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == (2, 2, 16)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).exists(), name

    session = ort.InferenceSession(str(out / dec["filename"]), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past_key_values.1.value"][1:4:2] == [2, 16]  # [batch, 2, past, 16]
    assert set(outputs) == {"logits"} | {
        f"present.{i}.{k}" for i in (0, 1) for k in ("key", "value")
    }


def test_corrupted_initializer_fails_the_gate(
    exported: dict[str, tuple[Path, dict]], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Perturb the largest 2-D weight initializer of a passing model: the gate rejects it."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_pu.export.runtimes import OrtRunner, TorchRunner
    from edge_pu.export.verify import build_reference, run_gate

    out, _ = exported["llama"]
    broken = shutil.copytree(out, tmp_path / "broken")
    model = onnx.load(str(broken / "model.onnx"))
    init = max(
        (i for i in model.graph.initializer if len(i.dims) == 2),
        key=lambda i: int(np.prod(i.dims)),
    )
    weights = numpy_helper.to_array(init).copy()
    weights[:, :4] += 0.5
    init.CopyFrom(numpy_helper.from_array(weights, init.name))
    onnx.save(model, str(broken / "model.onnx"))

    ref = build_reference(
        TorchRunner(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)),
        AutoTokenizer.from_pretrained(tiny_llama_dir),
    )
    with pytest.raises(GateFailed, match="logits_max_abs"):
        run_gate(OrtRunner(broken), ref, fmt="onnx", quant=None, artifact=broken / "model.onnx")


def test_quant_is_refused_for_onnx(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from edge_pu.export import ExportError

    with pytest.raises(ExportError, match="does not apply to onnx"):
        export(tiny_llama_dir, "onnx", tmp_path, quant="q8_0")
