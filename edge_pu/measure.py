"""Wall time and peak memory of one stage of work, for `edge-pu run`, the evaluation suite and
the benchmarks.

`Stages().stage(name)` is a context manager that records, for the code inside it:
- `seconds`: wall time (time.perf_counter);
- `rss_start_mb`: resident memory when the stage began;
- `peak_rss_mb`: the process's peak resident memory during the stage. On Linux the kernel's
  high-water mark is reset at the stage start (`/proc/self/clear_refs`, value 5), so the peak
  belongs to this stage alone (`peak_exact: true`). Elsewhere it falls back to ru_maxrss, which
  never goes down: the stage's peak is then exact only if it exceeds every earlier peak;
- `peak_delta_mb`: peak_rss_mb - rss_start_mb, the memory the stage itself added;
- `cuda_peak_mb`: torch.cuda.max_memory_allocated() over the stage, when torch is already
  imported and sees a GPU (host RSS says nothing about GPU memory).

tracemalloc cannot see torch's allocations (they bypass Python's allocator), hence RSS. A stage
opened inside another (an `edge-pu run`'s stages inside an evaluation's method stage) does not
reset the marks (RSS, CUDA), which would hide the outer stage's earlier peak: its peak is then
the running high-water mark since the outer stage began, an upper bound (`peak_exact: false`).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

MB = 2**20
_open = [0]  # stages open in this process (any Stages object)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return _ru_maxrss_bytes()  # no /proc (macOS): the peak is the best we have


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory since the last reset_peak() (or since the process began)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _ru_maxrss_bytes()


def _cuda() -> Any:
    torch = sys.modules.get("torch")  # never import torch just to measure
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


@dataclass
class StageStats:
    name: str
    seconds: float
    rss_start_mb: float
    peak_rss_mb: float
    peak_delta_mb: float
    peak_exact: bool
    cuda_peak_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


class Stages:
    """Sequential stage records: `with stages.stage("sample"): ...`; `stages.records`."""

    def __init__(self) -> None:
        self.records: list[StageStats] = []

    @contextmanager
    def stage(self, name: str, **extra: Any) -> Iterator[dict[str, Any]]:
        """Yields a dict the caller may fill with more fields (e.g. tokens) for the record."""
        cuda = _cuda()
        outermost = _open[0] == 0
        if cuda is not None:
            cuda.synchronize()
            if outermost:
                cuda.reset_peak_memory_stats()
        exact = outermost and reset_peak()
        start = rss_bytes()  # read after the reset: memory freed in between would put it above
        _open[0] += 1
        t0 = time.perf_counter()
        info: dict[str, Any] = dict(extra)
        try:
            yield info
        finally:
            _open[0] -= 1
            if cuda is not None:
                cuda.synchronize()
            seconds = time.perf_counter() - t0
            # The stage began at `start`, so its peak is at least that (the kernel's mark is
            # page-granular and a concurrent free can leave it a page below).
            peak = max(peak_rss_bytes(), rss_bytes(), start)
            self.records.append(StageStats(
                name, round(seconds, 3), round(start / MB, 1), round(peak / MB, 1),
                round(max(0, peak - start) / MB, 1), exact,
                round(cuda.max_memory_allocated() / MB, 1) if cuda is not None else None,
                info))

    def as_list(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.records]

    def add(self, record: dict[str, Any], **extra: Any) -> None:
        """Append a record saved earlier with as_dict() (e.g. by a resumed run)."""
        known = {f: record[f] for f in ("name", "seconds", "rss_start_mb", "peak_rss_mb",
                                        "peak_delta_mb", "peak_exact", "cuda_peak_mb")}
        rest = {k: v for k, v in record.items() if k not in known}
        self.records.append(StageStats(**known, extra={**rest, **extra}))
