"""glibc's mmap threshold, which the CPU predictions assume: `pin_cpu_allocator` sets it and
`cpu_allocator_threshold(cfg)` picks it per run from the plan (the torch backend calls both
before it loads the student).

Without a pinned threshold freed activations stay in the heap and RSS ran up to 1.6x higher than
the live tensors the planner counts.
"""

from __future__ import annotations

from ..config import RunConfig
from ..errors import EdgePuError
from ..model_shape import read_model_shape
from .budget import budget_for, model_config_path
from .fit import plan

TIGHT_MMAP_THRESHOLD = 128 * 1024  # what the CPU predictions are measured under
FAST_MMAP_THRESHOLD = 4 * 2**20
FAST_HEADROOM = 1.5  # the fast setting's peak RSS measured up to 1.38x the tight one's


def pin_cpu_allocator(threshold: int = TIGHT_MMAP_THRESHOLD) -> bool:
    """Make glibc hand freed tensor memory back to the OS; True where it applied (Linux glibc).

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
    activation-sized tensors come from the heap and are kept there after free: the process's
    RSS then holds the previous step's peak plus fragmentation, measured here at up to 1.6x the
    live tensors and growing from step to step. A fixed threshold keeps every tensor above it
    in its own mapping, returned on free, so RSS follows the live tensors this planner counts.
    That has a price: every mapping is page-faulted in afresh when touched. On SmolLM2 (bench/
    allocator.py, bench/README.md) 128 KiB made a DPO step of 8 rows 1.8x slower (8.3 s vs
    4.5 s) and sampling 1.3x slower than a 4 MiB threshold, which in turn peaked 38% higher
    (3.0 GB vs 2.2 GB). `cpu_allocator_threshold` picks between the two per run.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: no mallopt to call
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, threshold))


def cpu_allocator_threshold(cfg: RunConfig) -> int:
    """The mmap threshold for this run: fast (4 MiB) where the predicted peak, with the fast
    setting's extra heap, still fits the memory budget 1.5 times over; else tight (128 KiB),
    under which the predictions were measured. $EDGE_PU_MMAP_THRESHOLD (bytes; 0 leaves glibc's
    dynamic threshold alone) overrides."""
    import os

    env = os.environ.get("EDGE_PU_MMAP_THRESHOLD", "")
    if env.isdigit():
        return int(env)
    try:
        budget, _ = budget_for(cfg, "cpu")
        p = plan(cfg, read_model_shape(model_config_path(cfg.student.path)),
                 budget_bytes=budget or 2**62, backend="cpu")
    except (EdgePuError, OSError, ValueError, KeyError):
        return TIGHT_MMAP_THRESHOLD  # cannot size the run: stay predictable
    fast = budget and p.given_peak * FAST_HEADROOM <= budget
    return FAST_MMAP_THRESHOLD if fast else TIGHT_MMAP_THRESHOLD
