"""Which accelerator this machine has, found without importing a heavy framework.

`detect()` looks for an NVIDIA driver and for mlx on Apple Silicon with importlib's finder and
the file system only. It is a leaf module: the planner (which sizes `backend: auto`), the
distributed launcher, `edge-pu doctor` and the backend registry all read it, and it reads none
of them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil


def has_module(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def nvidia_present() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def detect() -> str:
    """cuda if an NVIDIA GPU and torch; mlx on Apple Silicon with mlx; else cpu."""
    if nvidia_present() and has_module("torch"):
        return "cuda"
    if platform.system() == "Darwin" and platform.machine() == "arm64" and has_module("mlx"):
        return "mlx"
    return "cpu"
