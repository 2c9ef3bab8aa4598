"""`edge-pu doctor`: which backends this machine can run, framework versions, devices, memory.

Reads versions from package metadata, so it imports no heavy framework.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

from .backends import available, detect, nvidia_present

PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "llama_cpp_python", "gguf",
            "onnxruntime", "onnx", "mlx", "mlx-lm")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def _profile_line() -> str:
    from .devices import detect_profile

    found = detect_profile()
    return (f"{found.name} (detected; budget {found.memory_budget_gib:g} GiB; use --set "
            f"device={found.name})" if found else "none detected (name one with device: ...)")


def report() -> str:
    lines = [f"edge_pu doctor — {platform.system()} {platform.machine()}, "
             f"Python {platform.python_version()}",
             f"  memory: {_memory_gib():.1f} GiB, CPU cores: {os.cpu_count()}",
             f"  NVIDIA driver present: {nvidia_present()}",
             f"  backends available: {', '.join(available()) or 'none'}; auto picks: {detect()}",
             f"  device profile: {_profile_line()}",
             "  packages:"]
    lines += [f"    {name:<18} {_version(name)}" for name in PACKAGES]
    return "\n".join(lines)
