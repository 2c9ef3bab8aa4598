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


def _pm(mean: float, sd: float, n: int, pct: bool = True) -> str:
    if pct:
        return f"{mean:.1%}" + (f" ± {sd:.1%}" if n > 1 else "")
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if n > 1 else "")


def _val(m: dict[str, Any]) -> str:
    v = m.get("validation_pass_rate_mean")
    return "—" if v is None else f"{v:.1%}"


def _lift(m: dict[str, Any], ref: str) -> str:
    c = m.get("lift_vs", {}).get(ref)
    return "—" if not c else f"{c['points']:+.1f} [{c['lo']:+.1f}, {c['hi']:+.1f}]"


def _benchmark_md(b: dict[str, Any]) -> list[str]:
    if not b:
        return []
    lines = ["", "## IFEval", "",
             f"{b['prompts']} IFEval prompts (a fixed subset), greedy answers of at most "
             f"{b['max_new_tokens']} tokens, the official checkers; accuracy in % (mean over "
             "seeds); lifts of prompt-level strict accuracy, paired, with bootstrap 95% "
             "intervals. " + b.get("tokenizer_note", ""), "",
             "| method | prompt strict | prompt loose | instruction strict | instruction loose "
             "| vs untrained | vs sft | vs sft-best |", "|---|---|---|---|---|---|---|---|"]
    for name, m in b["methods"].items():
        lines.append(f"| {name} | {m['prompt_strict']:.1%} | {m['prompt_loose']:.1%} | "
                     f"{m['inst_strict']:.1%} | {m['inst_loose']:.1%} | {_lift(m, 'none')} | "
                     f"{_lift(m, 'sft')} | {_lift(m, 'sft-best')} |")
    return lines


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
        f"{cfg['sampling']['max_new_tokens']} tokens; budget {suite.get('budget', {})} "
        f"(optimizer steps; ~{2 * cfg['train']['batch_size']} completion rows each); {seeds} "
        f"seed(s), mean ± sample sd over seeds. Greedy held-out answers of at most "
        f"{r['sizes']['eval_max_new_tokens']} tokens. Total {r['seconds']:.0f} s."
        + (f" The teacher's anchors pass their own prompt's checker on "
           f"{suite['anchors']['passed']} of {suite['anchors']['anchored']} training prompts "
           f"({suite['anchors']['share']:.0%}; mean quality "
           f"{suite['anchors']['mean_quality']:.3f})." if suite.get("anchors") else ""), "",
        "## Held-out pass rate by method", "",
        "Lifts are paired differences over the held-out prompts (each prompt's pass averaged "
        "over seeds) with a bootstrap 95% interval; an interval that contains 0 is no effect. "
        "Validation pass: the same adapters on the validation split, the column settings are "
        "chosen by.",
        "", "| method | what | pass rate | vs untrained (points) | vs sft | vs sft-best | "
        "vs its SFT start | mean quality | validation pass | train s | train peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        n = m["n_seeds"]
        lines.append(f"| {name} | {m['about']} | {_pm(m['pass_rate_mean'], m['pass_rate_sd'], n)}"
                     f" | {_lift(m, 'none')} | {_lift(m, 'sft')} | {_lift(m, 'sft-best')} | "
                     f"{_lift(m, 'sft-stage1') if name.startswith('sft+') else '—'} | "
                     f"{_pm(m['quality_mean'], m['quality_sd'], n, pct=False)} | "
                     f"{_val(m)} | {m['train_seconds_mean']:.0f} | "
                     f"{m['train_peak_rss_mb']:,.0f} |")
    idle = {name: sum(1 for run in m["seeds"] if "nothing_to_train" in run.get("train_diag", {}))
            for name, m in r["methods"].items()}
    lines += [f"\n{name}: in {n} of {r['methods'][name]['n_seeds']} seed(s) the PU round had "
              "nothing to train on (every prompt tied or left out by train.select); those seeds "
              "score the SFT stage alone." for name, n in idle.items() if n]
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
        ci = k.get("tau_ci")
        tau = "n/a" if k["mean_tau"] is None else _pm(k["mean_tau"], k["mean_tau_sd"], seeds,
                                                        pct=False) + (
            f" [{ci['lo']:.3f}, {ci['hi']:.3f}]" if ci else "")
        lines.append(f"| {spec} | {'yes' if k['anchor'] else 'no'} | {tau} | "
                     f"{k['prompts_used']} / {k['prompts_total']} | {k['top1_quality']:.3f} | "
                     f"{k['mean_quality']:.3f} | {k['best_quality']:.3f} |")
    lines += _benchmark_md(r.get("benchmark") or {})
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
