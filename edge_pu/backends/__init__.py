"""Backend registry with detection that never imports a heavy framework.

`detect()` looks for an NVIDIA driver and for mlx on Apple Silicon with importlib's finder and
the file system only; `make_backend(name)` imports the chosen backend's module on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil

from ..errors import EdgePuError
from .base import Backend, Sample, TrainBatch

REGISTRY: dict[str, str] = {
    "cpu": "edge_pu.backends.torch_backend:CPUBackend",
    "cuda": "edge_pu.backends.torch_backend:CUDABackend",
    "mlx": "edge_pu.backends.mlx_backend:MLXBackend",
}
NEEDS = {"cpu": "torch", "cuda": "torch", "mlx": "mlx"}


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available() -> list[str]:
    """Backends whose framework is installed here (mlx counts on Linux too, as MLX CPU)."""
    found = [name for name, mod in NEEDS.items() if _has(mod)]
    if "cuda" in found and not nvidia_present():
        found.remove("cuda")
    return found


def nvidia_present() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def detect() -> str:
    """cuda if an NVIDIA GPU and torch; mlx on Apple Silicon with mlx; else cpu."""
    if nvidia_present() and _has("torch"):
        return "cuda"
    if platform.system() == "Darwin" and platform.machine() == "arm64" and _has("mlx"):
        return "mlx"
    return "cpu"


def make_backend(name: str = "auto") -> Backend:
    if name == "auto":
        name = detect()
    if name not in REGISTRY:
        raise EdgePuError(f"config: backend {name!r} is not one of auto, {', '.join(REGISTRY)}.")
    if not _has(NEEDS[name]):
        extra = "mlx" if name == "mlx" else "torch"
        raise EdgePuError(f"backend {name!r} needs {NEEDS[name]}, which is not installed: "
                          f"pip install 'edge-pu[{extra}]'.")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Backend", "Sample", "TrainBatch", "available", "detect", "make_backend", "REGISTRY"]
