"""results.json, results.md and plots/*.png of an `edge-pu eval` run.

`write_outputs` writes the results (built by edge_pu.eval.results), the markdown tables and the
PNGs (edge_pu.eval.plots). Plots need matplotlib (in the `dev` extra); without
it they are skipped and results.md says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..jsonl import write_atomic
from .results import family_rows


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
