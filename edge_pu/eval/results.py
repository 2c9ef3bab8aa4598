"""results.json's numbers of an `edge-pu eval` run, from the per-seed records.

`build_results(...)` turns them into means, spreads and paired lifts (edge_pu.eval.stats);
`family_rows` is the pass rate per family that results.md's table and the family plot both show.
edge_pu.eval.report writes them out; edge_pu.eval.plots draws them.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

from .methods import method_named
from .ranking import RANK_SPECS


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _sd(xs: Sequence[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sample sd, min and max over seeds of pass rate and quality, overall and per family."""
    pr, q = [r["pass_rate"] for r in runs], [r["quality"] for r in runs]
    fams = runs[0]["by_family"] if runs else {}
    return {"pass_rate_mean": _mean(pr), "pass_rate_sd": _sd(pr), "pass_rate_min": min(pr),
            "pass_rate_max": max(pr), "quality_mean": _mean(q), "quality_sd": _sd(q),
            "n_seeds": len(runs),
            "validation_pass_rate_mean": _mean(v) if (v := [
                r["validation_pass_rate"] for r in runs if "validation_pass_rate" in r]) else None,
            "by_family": {f: {"pass_rate_mean": _mean([r["by_family"][f]["pass_rate"]
                                                       for r in runs]),
                              "quality_mean": _mean([r["by_family"][f]["quality"] for r in runs]),
                              "n": fams[f]["n"]} for f in fams}}


def build_results(*, opts: dict[str, Any], sizes: dict[str, int], cfg: dict[str, Any],
                  threads: int, suite: dict[str, Any], before: dict[str, Any],
                  methods: dict[str, list[dict[str, Any]]],
                  rankers: dict[str, list[dict[str, Any]]], teacher: dict[str, Any],
                  stages: list[dict[str, Any]], curves: dict[str, dict[str, list[float]]],
                  seconds: float, benchmark: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from .stats import mean_ci, paired_lift, per_prompt_mean, verdict

    def passes(runs: list[dict[str, Any]]) -> list[float]:
        return per_prompt_mean([r["passes"] for r in runs if "passes" in r])

    per_method = {name: passes(runs) for name, runs in methods.items()}
    base = {"none": [float(x) for x in before.get("passes", [])],
            "sft": per_method.get("sft", []), "sft-best": per_method.get("sft-best", []),
            "sft-stage1": per_method.get("sft-stage1", [])}

    out_methods: dict[str, Any] = {}
    for name, runs in methods.items():
        agg = aggregate(runs)
        train = [s for s in stages if s["name"] == f"train:{name}"]
        out_methods[name] = {
            "about": method_named(name).about, **agg,
            "lift_points_mean": 100 * (agg["pass_rate_mean"] - before["pass_rate"]),
            "lift_points_per_seed": [100 * (r["pass_rate"] - before["pass_rate"]) for r in runs],
            "train_seconds_mean": _mean([s["seconds"] for s in train]) if train else 0.0,
            "train_peak_rss_mb": max((s["peak_rss_mb"] for s in train), default=0.0),
            "lift_vs": {}, "seeds": runs}
        for ref, b in base.items():
            a = per_method[name]
            if ref != name and a and b and len(a) == len(b):
                ci = paired_lift(a, b)
                out_methods[name]["lift_vs"][ref] = {
                    "points": 100 * ci["mean"], "lo": 100 * ci["lo"], "hi": 100 * ci["hi"],
                    "prompts": ci["n"], "verdict": verdict(ci)}
    out_rankers: dict[str, Any] = {}
    for spec, runs in rankers.items():
        taus = [r["mean_tau"] for r in runs if r["mean_tau"] is not None]
        pooled = [t for r in runs for t in r.get("taus", [])]
        out_rankers[spec] = {
            "mode": RANK_SPECS[spec][0], "anchor": RANK_SPECS[spec][1],
            "mean_tau": _mean(taus) if taus else None, "mean_tau_sd": _sd(taus),
            "tau_ci": mean_ci(pooled) if pooled else None,
            "candidates_from": runs[0].get("candidates_from", "") if runs else "",
            "prompts_used": sum(r["prompts_used"] for r in runs),
            "prompts_total": sum(r["prompts_total"] for r in runs),
            **{k: _mean([r[k] for r in runs]) for k in ("top1_quality", "mean_quality",
                                                         "best_quality")},
            "seeds": runs}
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {"suite": suite, "sizes": sizes, "options": opts, "config": cfg,
            "environment": {"torch_threads": threads, "cpu_count": os.cpu_count(),
                            "load_average_at_end": [round(x, 2) for x in load],
                            "torch": torch.__version__},
            "before": before, "methods": out_methods, "rankers": out_rankers,
            "teacher_calls": teacher, "stages": stages, "curves": curves,
            "benchmark": _benchmark(benchmark or {}), "seconds": round(seconds, 1)}


def _benchmark(b: dict[str, Any]) -> dict[str, Any]:
    """IFEval means over seeds, and paired lifts of prompt-level strict accuracy."""
    if not b:
        return {}
    from .stats import paired_lift, per_prompt_mean, verdict

    keys = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")
    out: dict[str, Any] = {"prompts": b["prompts"], "max_new_tokens": b["max_new_tokens"],
                           "methods": {}}
    strict = {m: per_prompt_mean([[float(p["strict"]) for p in r["per_prompt"]] for r in runs])
              for m, runs in b["methods"].items()}
    for m, runs in b["methods"].items():
        row: dict[str, Any] = {k: _mean([r[k] for r in runs]) for k in keys}
        row["n_seeds"] = len(runs)
        row["lift_vs"] = {}
        for ref in ("none", "sft", "sft-best"):
            if ref != m and ref in strict and strict[ref] and strict[m]:
                ci = paired_lift(strict[m], strict[ref])
                row["lift_vs"][ref] = {"points": 100 * ci["mean"], "lo": 100 * ci["lo"],
                                       "hi": 100 * ci["hi"], "verdict": verdict(ci)}
        out["methods"][m] = row
    out["tokenizer_note"] = next((r.get("tokenizer_note") for runs in b["methods"].values()
                                  for r in runs if r.get("tokenizer_note")), "")
    return out


def family_rows(r: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Pass rate per family: the untrained student first, then each trained method."""
    rows = {"untrained": {f: v["pass_rate"] for f, v in r["before"]["by_family"].items()}}
    for name, m in r["methods"].items():
        if name != "none":
            rows[name] = {f: v["pass_rate_mean"] for f, v in m["by_family"].items()}
    return rows
