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
