"""Shared fixtures: tiny offline models, and tests/ on sys.path for `from tiny import ...`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """A tiny demo run (SFT, then 2 DPO rounds, held-out before/after) with a verified f16 GGUF
    export: what `report`, `chat` and `serve` are tested on."""
    from edge_pu.cli import main

    run_dir = tmp_path_factory.mktemp("finished") / "demo"
    assert main(["demo", "--algorithm", "dpo", "--student", str(tiny_llama_dir), "--run-dir",
                 str(run_dir), "--set", "train.steps=3", "--set", "train.rounds=2",
                 "--set", "train.lr=0.01", "--set", "sft.steps=3", "--set", "sft.lr=0.01",
                 "--set", "sampling.max_new_tokens=8"]) == 0
    import importlib.util

    if importlib.util.find_spec("llama_cpp"):  # the GGUF gate's runtime (tests/test_serve.py)
        assert main(["export", str(run_dir), "--format", "gguf", "--quant", "f16"]) == 0
    return run_dir
