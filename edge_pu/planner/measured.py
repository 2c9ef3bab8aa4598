"""The planner's predictions beside what a run measured: summary.json's `stages`, `memory_plan`
and `plan_vs_measured`, and the `[stages]` table `edge-pu run` prints at its end.

The plan predicts resident memory (RSS), so the comparison is made on the CPU backend only. A
stage that a rerun read back from disk (`resumed: true` in its record, set by the pipeline when
every candidate, score or the SFT state was already there) is marked and left out: its peak is
that of reading files, and comparing it with the plan made the plan look 18-71% too high.
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..errors import EdgePuError
from ..measure import MB, Stages
from .budget import model_config_path
from .fit import plan


def stage_memory(cfg: RunConfig, backend: Any, meter: Stages) -> dict[str, Any]:
    """summary.json's `stages` (each stage's seconds and peak RSS) and `memory_plan` (the
    planner's predicted peak per stage, runtime included, for this config), printed side by
    side. The prediction is for RSS, so it is compared on the CPU backend only. A stage whose
    work was all read from disk (`resumed: true`: a rerun of an interrupted run) is marked so and
    left out of `plan_vs_measured`: its peak is that of reading files, not of the work."""
    out: dict[str, Any] = {"stages": meter.as_list()}
    predicted: dict[str, float] = {}
    if getattr(backend, "name", "") == "cpu":
        try:
            p = plan(cfg, model_config_path(cfg.student.path), budget_bytes=2**62,
                     backend="cpu")
            predicted = {st.name: round((st.total + p.runtime_bytes) / MB, 1)
                         for st in p.stages}
        except (EdgePuError, OSError, ValueError, KeyError):
            predicted = {}  # a student the planner cannot size: measured numbers only
        out["memory_plan"] = predicted
        out["plan_vs_measured"] = {}
    lines = []
    for rec in out["stages"]:
        want = predicted.get(rec["name"])
        key = rec["name"] + (f" r{rec['round']}" if "round" in rec else "")
        if rec.get("resumed"):
            vs = ", resumed: read from disk, not run (no plan comparison)"
        elif want:
            out["plan_vs_measured"][key] = round(rec["peak_rss_mb"] / want - 1, 3)
            vs = f", planned {want:,.0f} MiB ({rec['peak_rss_mb'] / want - 1:+.0%})"
        else:
            vs = ""
        lines.append(f"  {key:<10} {rec['seconds']:>8.1f} s  peak RSS "
                     f"{rec['peak_rss_mb']:>8,.0f} MiB{vs}"
                     + ("" if rec["peak_exact"] else " (upper bound)"))
    if lines:
        print("[stages] wall time and peak memory:\n" + "\n".join(lines), flush=True)
    return out
