"""Does a ranker order a run's candidates the way a checker does? Label-free rankers against the
workload's constraint checkers, on the candidates an `edge-pu eval --suite workload` drew.

    .venv/bin/python bench/ranker_agreement.py --eval-dir runs/ifeval-lift --seed 0 \\
        --rankers recall likelihood judge judge:rating similarity bleu --threads 1 \\
        [--engine llama-cpp]

A ranker named `MODE-noanchor` (e.g. `judge-noanchor:rating`) scores without the anchor shown.

Reads OUT/seed-S/shared-sft/candidates.jsonl (K candidates per training prompt, drawn from the
SFT policy), the anchors and the tasks; loads the student with the SFT checkpoint the eval
saved (seed-S/sft-path/step-N, N = the two-stage split) as both policy and reference, as the
PU stage sees it; scores every prompt's candidates with each ranker; and prints, per ranker:
- pairwise agreement with the checker (share kept of the prompt's constraints): over candidate
  pairs whose checker quality differs and whose scores differ, the share ordered the same way
  (0.5 is chance);
- mean Kendall tau per prompt (edge_pu.eval.ranking.summarize) and the checker quality of each
  prompt's top-ranked candidate against the candidates' mean and best.
Training prompts only: nothing here touches the held-out split or IFEval.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any


def pairwise(scores: list[list[float]], quality: list[list[float]]) -> tuple[int, int]:
    agree = total = 0
    for s, q in zip(scores, quality, strict=True):
        for i in range(len(q)):
            for j in range(i + 1, len(q)):
                if q[i] != q[j] and s[i] != s[j]:
                    total += 1
                    agree += (q[i] > q[j]) == (s[i] > s[j])
    return agree, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-dir", default="runs/ifeval-lift")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rankers", nargs="+", default=["recall", "likelihood", "judge"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine", choices=("backend", "llama-cpp"), default="backend",
                    help="what the rankers score with (ranker.engine): torch, or llama.cpp "
                         "over the student's GGUF with the SFT adapter (about 3x faster)")
    ap.add_argument("--sft-step", type=int, default=16,
                    help="the SFT checkpoint the candidates were drawn from (the eval's split)")
    a = ap.parse_args(argv)
    import dataclasses

    import torch

    from edge_pu.backends import make_backend
    from edge_pu.config import build_config
    from edge_pu.data import Prompt
    from edge_pu.eval.ranking import summarize
    from edge_pu.eval.sft_path import load_checkpoint
    from edge_pu.rank import RANKERS, RankItem
    from edge_pu.tasks import Task, check

    torch.set_num_threads(a.threads)
    out = Path(a.eval_dir)
    saved = json.loads((out / "eval_config.json").read_text())
    cfg = build_config([(str(out / "eval_config.json"), saved["config"])])
    cfg = dataclasses.replace(
        cfg, sampling=dataclasses.replace(cfg.sampling, engine=a.engine),
        ranker=dataclasses.replace(cfg.ranker, engine=a.engine))
    tasks = {t["id"]: Task(**t) for t in map(json.loads, open(out / "tasks.jsonl"))}
    anchors = {r["id"]: r["anchor"] for r in map(json.loads, open(out / "anchors" /
                                                                     "anchors.jsonl"))}
    cands: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in map(json.loads, open(out / f"seed-{a.seed}" / "shared-sft" / "candidates.jsonl")):
        cands[rec["prompt_id"]].append(rec)
    pids = sorted(cands)
    items = [RankItem(p, Prompt(p, tasks[p].prompt), anchors[p],
                      [c["token_ids"] for c in cands[p]], [c["text"] for c in cands[p]])
             for p in pids]
    quality = [[check(tasks[p], c["text"].strip()) for c in cands[p]] for p in pids]
    backend: Any = make_backend("cpu")
    backend.load(cfg)
    step = a.sft_step
    load_checkpoint(backend, out / f"seed-{a.seed}" / "sft-path", step)
    backend.set_reference()
    scorer: Any = backend
    if a.engine == "llama-cpp":
        import tempfile

        from edge_pu.pipeline import make_engine

        scorer = make_engine(backend, cfg, Path(tempfile.mkdtemp(prefix="agree-")))
    print(f"[bench] {len(pids)} prompts x K={len(quality[0])}, SFT step {step}; candidates' "
          f"checker quality mean {statistics.fmean(q for qs in quality for q in qs):.3f}, "
          f"best-of-K {statistics.fmean(max(q) for q in quality):.3f}", flush=True)
    rows = []
    for spec in a.rankers:
        mode, _, style = spec.partition(":")
        mode, no_anchor = mode.removesuffix("-noanchor"), mode.endswith("-noanchor")
        rcfg = dataclasses.replace(cfg.ranker, mode=mode,
                                   **({"judge_style": style} if style else {}))
        scores = RANKERS[mode](scorer, items, rcfg, use_anchor=not no_anchor)
        agree, total = pairwise(scores, quality)
        s = summarize(scores, quality)
        rows.append((spec, agree, total, s))
        print(f"{spec:<14} pairwise agreement {agree}/{total} = {agree / max(1, total):.2f}; "
              f"mean tau {s['mean_tau'] if s['mean_tau'] is None else round(s['mean_tau'], 3)}; "
              f"top-1 quality {s['top1_quality']:.3f} (mean {s['mean_quality']:.3f}, best "
              f"{s['best_quality']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
