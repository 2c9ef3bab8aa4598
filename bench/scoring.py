"""Benchmark: the rankers' scoring passes, torch (the backend) vs llama.cpp (the engine view).

    python bench/scoring.py [--model smollm2|qwen-0.5b|qwen-1.5b] [--prompts 8] [--k 8]
        [--max-new-tokens 40] [--rankers recall likelihood judge] [--repeats 2] [--rounds 1]
        [--threads 2] [--json OUT.json]

Both engines score the same candidates: K per prompt, drawn once by llama.cpp from the
student's own GGUF (temperature 1, seeded, so every child draws the same ones) for chat-templated
task-suite prompts, with the oracle's answer as the anchor. The `torch` engine is the CPU
backend (the student's dequantized weights); `llama-cpp` is edge_pu.backends.llamacpp_engine's
view of it (the GGUF itself, the rankers' batches of ranker.batch_size rows, a prompt's shared
prefix decoded once). Each (engine, round) is a child process: one warm-up pass per ranker,
then `--repeats` timed passes. Reported: median candidates scored per second per ranker, the
ratio llama.cpp / torch from the same invocation, and how far the two engines' scores are apart
(max |difference|, and the mean Kendall tau between the two orders of each prompt's K).
`--greedy N` also times the greedy evaluation (edge_pu.evaluate.greedy_answers, batches of 30,
40 new tokens) of N other task prompts by both, with the share of identical answers and each
engine's pass rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    interleaved,
    load_average,
    median,
    model_dir,
    set_threads,
    spread,
    student_path,
)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    threads = set_threads(spec["threads"])
    from edge_pu.backends import make_backend
    from edge_pu.backends.llamacpp_engine import EngineView
    from edge_pu.backends.llamacpp_sampler import LlamaCppSampler
    from edge_pu.config import SamplingConfig, load_config
    from edge_pu.data import Prompt
    from edge_pu.demo import DEFAULTS
    from edge_pu.eval.ranking import score_items
    from edge_pu.rank import RankItem
    from edge_pu.tasks import generate_tasks

    base = json.loads(json.dumps(DEFAULTS))
    base.update(student={"path": spec["student_path"], "max_length": 512}, backend="cpu")
    cfg = load_config(None, base=base)
    backend: Any = make_backend("cpu")
    backend.load(cfg)
    sampler = LlamaCppSampler(cfg, backend.student_dir, Path(tempfile.mkdtemp()),
                              backend.eos_ids, backend.decode)
    tasks = generate_tasks(spec["prompts"], seed=0)
    prompts = [Prompt(f"p{i}", t.prompt) for i, t in enumerate(tasks)]
    ids = [backend.chat_ids([{"role": "user", "content": t.prompt}]) for t in tasks]
    k = spec["k"]
    scfg = SamplingConfig(k=k, max_new_tokens=spec["max_new_tokens"], temperature=1.0,
                          top_p=0.95, prompt_batch=len(ids))
    drawn = sampler.sample(ids, k, scfg, list(range(len(ids))))
    items = [RankItem(p.id, p, t.answer, [s.token_ids for s in row], [s.text for s in row])
             for p, t, row in zip(prompts, tasks, drawn, strict=True)]
    scorer = backend if spec["engine"] == "torch" else EngineView(backend, sampler)
    out: dict[str, Any] = {**spec, "threads": threads, "candidates": len(items) * k,
                           "candidate_tokens": statistics.fmean(
                               len(c) for it in items for c in it.candidates), "rankers": {}}
    for mode in spec["rankers"]:
        score_items(scorer, items[:1], mode, cfg.ranker, k)  # warm-up
        secs, scores = [], None
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            scores = score_items(scorer, items, mode, cfg.ranker, k)
            secs.append(time.perf_counter() - t0)
        out["rankers"][mode] = {"seconds": secs, "scores": scores,
                                "candidates_per_s": [len(items) * k / s for s in secs]}
    if spec["greedy"]:  # the greedy evaluation: held-out-like prompts, 40 new tokens
        from edge_pu.evaluate import greedy_answers
        from edge_pu.tasks import passed

        held = generate_tasks(spec["greedy"], seed=1)
        greedy_answers(scorer, held[:2], adapter=False, max_new_tokens=4, batch=30)  # warm-up
        t0 = time.perf_counter()
        answers = greedy_answers(scorer, held, adapter=False, max_new_tokens=40, batch=30)
        out["greedy"] = {"seconds": time.perf_counter() - t0, "answers": answers,
                         "pass_rate": statistics.fmean(passed(t, a) for t, a in
                                                       zip(held, answers, strict=True))}
    sampler.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--rankers", nargs="+", default=["recall", "likelihood", "judge"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--greedy", type=int, default=0, metavar="N",
                    help="also time the greedy evaluation of N task prompts (40 tokens)")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    model_dir(args.model)  # the dequantized folder exists before the children time anything
    spec = {"student_path": str(student_path(args.model)), "prompts": args.prompts, "k": args.k,
            "max_new_tokens": args.max_new_tokens, "rankers": args.rankers,
            "repeats": args.repeats, "threads": args.threads, "greedy": args.greedy}
    print(f"[bench] scoring: {args.model}, {args.prompts} prompts x K={args.k}, candidates up "
          f"to {args.max_new_tokens} tokens, threads {args.threads}; load average "
          f"{load_average()}", flush=True)
    results = interleaved(__file__, spec, ["torch", "llama-cpp"], args.rounds,
                          lambda got: "  ".join(
                              f"{m} {', '.join(f'{x:.1f}' for x in r['candidates_per_s'])}/s"
                              for m, r in got["rankers"].items()))
    text = _summarise(results, args.rankers)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "results": results,
                                               "summary": text}, indent=2))


def _summarise(results: dict[str, list[dict[str, Any]]], rankers: list[str]) -> str:
    from edge_pu.algo.rank_metrics import kendall_tau

    first = results["torch"][0]
    lines = [f"{first['candidates']} candidates, {first['candidate_tokens']:.1f} tokens mean",
             "| ranker | torch candidates/s | llama.cpp candidates/s | llama.cpp / torch | "
             "max abs score difference | Kendall tau between the engines' orders |",
             "|---|---|---|---|---|---|"]
    for m in rankers:
        rate = {e: [x for o in outs for x in o["rankers"][m]["candidates_per_s"]]
                for e, outs in results.items()}
        a, b = (results[e][0]["rankers"][m]["scores"] for e in ("torch", "llama-cpp"))
        diff = max(abs(x - y) for ra, rb in zip(a, b, strict=True)
                   for x, y in zip(ra, rb, strict=True))
        taus = [kendall_tau(ra, rb) for ra, rb in zip(a, b, strict=True) if len(set(ra)) > 1]
        lines.append(f"| {m} | {median(rate['torch']):.1f} ({spread(rate['torch'])}) | "
                     f"{median(rate['llama-cpp']):.1f} ({spread(rate['llama-cpp'])}) | "
                     f"{median(rate['llama-cpp']) / median(rate['torch']):.2f}x | {diff:.3f} | "
                     f"{statistics.fmean(taus) if taus else float('nan'):.3f} |")
    if "greedy" in first:
        a, b = (results[e][0]["greedy"] for e in ("torch", "llama-cpp"))
        same = statistics.fmean(x == y for x, y in zip(a["answers"], b["answers"], strict=True))
        secs = {e: median([o["greedy"]["seconds"] for o in outs]) for e, outs in results.items()}
        lines.append(f"\ngreedy evaluation, {len(a['answers'])} prompts x 40 tokens: torch "
                     f"{secs['torch']:.1f} s, llama.cpp {secs['llama-cpp']:.1f} s "
                     f"({secs['torch'] / secs['llama-cpp']:.2f}x); identical answers "
                     f"{same:.0%}; pass rate torch {a['pass_rate']:.1%}, llama.cpp "
                     f"{b['pass_rate']:.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
