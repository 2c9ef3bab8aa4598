"""Backend registry: `make_backend(name)` imports the chosen backend's module on first use (by
string, so this package imports no framework); `detect()` (edge_pu.hardware) picks for "auto".
"""

from __future__ import annotations

import importlib

from ..errors import EdgePuError
from ..hardware import detect, has_module, nvidia_present
from .base import Backend, Sample, TrainBatch

REGISTRY: dict[str, str] = {
    "cpu": "edge_pu.backends.torch_backend:CPUBackend",
    "cuda": "edge_pu.backends.torch_backend:CUDABackend",
    "mlx": "edge_pu.backends.mlx_backend:MLXBackend",
}
NEEDS = {"cpu": "torch", "cuda": "torch", "mlx": "mlx"}


def available() -> list[str]:
    """Backends whose framework is installed here (mlx counts on Linux too, as MLX CPU)."""
    found = [name for name, mod in NEEDS.items() if has_module(mod)]
    if "cuda" in found and not nvidia_present():
        found.remove("cuda")
    return found


def make_backend(name: str = "auto") -> Backend:
    if name == "auto":
        name = detect()
    if name not in REGISTRY:
        raise EdgePuError(f"config: backend {name!r} is not one of auto, {', '.join(REGISTRY)}.")
    if not has_module(NEEDS[name]):
        extra = "mlx" if name == "mlx" else "torch"
        raise EdgePuError(f"backend {name!r} needs {NEEDS[name]}, which is not installed: "
                          f"pip install 'edge-pu[{extra}]'.")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


__all__ = ["Backend", "Sample", "TrainBatch", "available", "detect", "make_backend",
           "nvidia_present", "REGISTRY"]
