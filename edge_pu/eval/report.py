"""results.json, results.md and plots/*.png of an `edge-pu eval` run.

`build_results(...)` turns the per-seed records into means and spreads; `write_outputs` writes
the JSON, the markdown tables and the PNGs. Plots need matplotlib (in the `dev` extra); without
it they are skipped and results.md says so.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..jsonl import write_atomic
from .methods import METHODS
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
            "by_family": {f: {"pass_rate_mean": _mean([r["by_family"][f]["pass_rate"]
                                                       for r in runs]),
                              "quality_mean": _mean([r["by_family"][f]["quality"] for r in runs]),
                              "n": fams[f]["n"]} for f in fams}}


def build_results(*, opts: dict[str, Any], sizes: dict[str, int], cfg: dict[str, Any],
                  threads: int, suite: dict[str, Any], before: dict[str, Any],
                  methods: dict[str, list[dict[str, Any]]],
                  rankers: dict[str, list[dict[str, Any]]], teacher: dict[str, Any],
                  stages: list[dict[str, Any]], curves: dict[str, dict[str, list[float]]],
                  seconds: float) -> dict[str, Any]:
    import torch

    out_methods: dict[str, Any] = {}
    for name, runs in methods.items():
        agg = aggregate(runs)
        train = [s for s in stages if s["name"] == f"train:{name}"]
        out_methods[name] = {
            "about": METHODS[name].about, **agg,
            "lift_points_mean": 100 * (agg["pass_rate_mean"] - before["pass_rate"]),
            "lift_points_per_seed": [100 * (r["pass_rate"] - before["pass_rate"]) for r in runs],
            "train_seconds_mean": _mean([s["seconds"] for s in train]) if train else 0.0,
            "train_peak_rss_mb": max((s["peak_rss_mb"] for s in train), default=0.0),
            "seeds": runs}
    out_rankers: dict[str, Any] = {}
    for spec, runs in rankers.items():
        taus = [r["mean_tau"] for r in runs if r["mean_tau"] is not None]
        out_rankers[spec] = {
            "mode": RANK_SPECS[spec][0], "anchor": RANK_SPECS[spec][1],
            "mean_tau": _mean(taus) if taus else None, "mean_tau_sd": _sd(taus),
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
            "seconds": round(seconds, 1)}


def family_rows(r: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Pass rate per family: the untrained student first, then each trained method."""
    rows = {"untrained": {f: v["pass_rate"] for f, v in r["before"]["by_family"].items()}}
    for name, m in r["methods"].items():
        if name != "none":
            rows[name] = {f: v["pass_rate_mean"] for f, v in m["by_family"].items()}
    return rows


def _pm(mean: float, sd: float, n: int, pct: bool = True) -> str:
    if pct:
        return f"{mean:.1%}" + (f" ± {sd:.1%}" if n > 1 else "")
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if n > 1 else "")


def markdown(r: dict[str, Any], plots: list[str], plot_note: str = "") -> str:
    cfg, env, suite = r["config"], r["environment"], r["suite"]
    seeds = r["options"]["seeds"]
    lines = [
        "# edge_pu evaluation", "",
        f"Student `{cfg['student']['path']}` on backend `{cfg['backend']}`, "
        f"{env['torch_threads']} torch thread(s), {env['cpu_count']} cores, load average at "
        f"the end {env['load_average_at_end'][0]} (1 min). {suite['train_prompts']} training "
        f"and {suite['heldout_prompts']} held-out prompts ({len(suite['families'])} families, "
        f"task seed {suite['task_seed']}); K = {cfg['sampling']['k']} candidates of at most "
        f"{cfg['sampling']['max_new_tokens']} tokens; {cfg['train']['steps']} optimizer steps "
        f"of {2 * cfg['train']['batch_size']} completion rows for every method; {seeds} "
        f"seed(s), mean ± sample sd over seeds. Greedy held-out answers of at most "
        f"{r['sizes']['eval_max_new_tokens']} tokens. Total {r['seconds']:.0f} s.", "",
        "## Held-out pass rate by method", "",
        "| method | what | pass rate | lift vs untrained (points) | mean quality | "
        "train s | train peak RSS MB |", "|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        n = m["n_seeds"]
        lift = "—" if name == "none" else f"{m['lift_points_mean']:+.1f}" + (
            f" (seeds {', '.join(f'{x:+.1f}' for x in m['lift_points_per_seed'])})"
            if n > 1 else "")
        lines.append(f"| {name} | {m['about']} | {_pm(m['pass_rate_mean'], m['pass_rate_sd'], n)}"
                     f" | {lift} | {_pm(m['quality_mean'], m['quality_sd'], n, pct=False)} | "
                     f"{m['train_seconds_mean']:.0f} | {m['train_peak_rss_mb']:.0f} |")
    lines += ["", f"Untrained student (greedy): pass rate {r['before']['pass_rate']:.1%}, mean "
              f"quality {r['before']['quality']:.3f}.", "",
              "## Ranker quality", "",
              "Kendall tau-b between ranker scores and checker quality over each prompt's K "
              "candidates, averaged over the prompts whose candidates differ in quality; top-1 "
              "quality is the checker quality of the top-scored candidate (random pick: mean "
              "quality; oracle pick: best quality).", "",
              "| ranker | anchor | mean tau | prompts used / total | top-1 quality | mean quality "
              "| best quality |", "|---|---|---|---|---|---|---|"]
    for spec, k in r["rankers"].items():
        tau = "n/a" if k["mean_tau"] is None else _pm(k["mean_tau"], k["mean_tau_sd"], seeds,
                                                        pct=False)
        lines.append(f"| {spec} | {'yes' if k['anchor'] else 'no'} | {tau} | "
                     f"{k['prompts_used']} / {k['prompts_total']} | {k['top1_quality']:.3f} | "
                     f"{k['mean_quality']:.3f} | {k['best_quality']:.3f} |")
    fams = list(r["before"]["by_family"])
    lines += ["", "## Pass rate by family (mean over seeds)", "",
              "| method | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for name, by_family in family_rows(r).items():
        lines.append(f"| {name} | " + " | ".join(f"{by_family[f]:.0%}" for f in fams) + " |")
    t = r["teacher_calls"]
    lines += ["", "## Teacher calls", "",
              f"{t['requests']} teacher requests for {t['prompts']} training prompts, counted in "
              f"{t['ledgers']} ledger(s): per prompt min {t['per_prompt_min']}, max "
              f"{t['per_prompt_max']}, mean {t['per_prompt_mean']:.2f}. Exactly one per prompt: "
              f"**{'yes' if t['exactly_one'] else 'NO'}**.", "",
              "## Wall time and peak memory per stage", "",
              "Peak RSS is the process's high-water mark during the stage (reset at its start "
              "where the OS allows: `exact`); `added` is peak minus RSS at the stage start.", "",
              "| stage | seed | seconds | RSS at start MB | peak RSS MB | added MB | exact |",
              "|---|---|---|---|---|---|---|"]
    for s in r["stages"]:
        note = " (resumed)" if s.get("resumed") else " (cached)" if s.get("cached") else ""
        lines.append(f"| {s['name']}{note} | {s.get('seed', '')} | {s['seconds']:.1f} | "
                     f"{s['rss_start_mb']:.0f} | {s['peak_rss_mb']:.0f} | "
                     f"{s['peak_delta_mb']:.0f} | {'yes' if s['peak_exact'] else 'no'} |")
    lines += ["", "## Plots", ""]
    lines += [f"![{p}](plots/{p})" for p in plots] or [plot_note]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: Path) -> None:
    write_atomic(out / "results.json", json.dumps(results, indent=1))
    try:
        from .plots import write_plots

        plots, note = write_plots(results, out / "plots"), ""
    except ImportError:
        plots, note = [], ("Plots skipped: matplotlib is not installed "
                           "(`pip install matplotlib`, or the `dev` extra).")
    write_atomic(out / "results.md", markdown(results, plots, note))
    print(f"[eval] wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f" and {len(plots)} plots in {out / 'plots'}" if plots else f"; {note}"), flush=True)
