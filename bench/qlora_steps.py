"""QLoRA training steps (DPO, GRPO-advantage, GRPO-distribution) with the planner's prediction.

    python bench/qlora_steps.py --device cuda [--model qwen2.5-0.5b] [--quant nf4]
        [--rows 8] [--prompt-len 256] [--completion-len 256] [--steps 3] [--json OUT]
    python bench/qlora_steps.py --device cpu --model tiny --quant none   # checks the script

Each case is a child process (clean memory peak): load the student through the edge_pu backend
(NF4 double-quant with bf16 compute on CUDA, LoRA r16 on all seven projections, gradient
checkpointing as given), compute the reference log-probs once, then time `--steps` optimizer
steps after one warm-up. The batch is `--rows` completions of prompt_len + completion_len
tokens: DPO as rows/2 pairs, GRPO as rows/K groups of K=4 candidates with a label distribution
and sampling-policy log-probs. Printed per case: median step time, peak memory measured
(CUDA: torch.cuda.max_memory_allocated over load + reference + steps; CPU: peak RSS) and the
planner's predicted peak for the same config (edge_pu.planner.plan; on CUDA without its
CUDA-context allowance, which max_memory_allocated does not see), and their ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import load_average, model_dir, run_child, set_threads  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
K = 4
CASES = {"dpo": ("dpo", "distribution"), "grpo-advantage": ("grpo", "advantage"),
         "grpo-distribution": ("grpo", "distribution")}


def _config(spec: dict[str, Any]) -> Any:
    from edge_pu.config import load_config

    algorithm, variant = CASES[spec["case"]]
    micro = spec["rows"] // (2 if algorithm == "dpo" else K)
    return load_config(None, base={
        "student": {"path": spec["model_dir"], "dtype": spec["dtype"], "quant": spec["quant"],
                    "max_length": spec["prompt_len"] + spec["completion_len"]},
        "sampling": {"k": K, "max_new_tokens": spec["completion_len"]},
        "lora": {"r": 16, "alpha": 32, "target_modules": TARGETS},
        "ranker": {"batch_size": spec["rows"]},
        "backend": spec["device"],
        "train": {"algorithm": algorithm, "grpo_variant": variant, "micro_batch": micro,
                  "batch_size": micro, "lr": 1e-4, "beta": 0.1 if algorithm == "dpo" else 5.0,
                  "gradient_checkpointing": spec["gc"]}})


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    threads = set_threads(spec["threads"])
    import torch

    from edge_pu.algo.losses import LOSSES
    from edge_pu.backends import TrainBatch, make_backend
    from edge_pu.planner import plan
    from edge_pu.train import loss_config, loss_name

    cfg = _config(spec)
    cuda = spec["device"] == "cuda"
    backend: Any = make_backend(spec["device"])
    backend.load(cfg)
    rng = random.Random(0)
    vocab = min(len(backend.tok), 30000)
    rows = spec["rows"]
    prompts = [[rng.randrange(100, vocab) for _ in range(spec["prompt_len"])]
               for _ in range(rows // (2 if cfg.train.algorithm == "dpo" else K))]
    per = 2 if cfg.train.algorithm == "dpo" else K
    rows_p = [p for p in prompts for _ in range(per)]
    rows_c = [[rng.randrange(100, vocab) for _ in range(spec["completion_len"])]
              for _ in rows_p]
    ref = backend.logprobs(rows_p, rows_c, adapter=False)
    if cfg.train.algorithm == "dpo":
        batch = TrainBatch(rows_p, rows_c, ref,
                           pairs=[(2 * i, 2 * i + 1) for i in range(len(prompts))])
    else:
        target = [0.4, 0.3, 0.2, 0.1]
        batch = TrainBatch(rows_p, rows_c, ref, old_token_logp=[list(r) for r in ref],
                           groups=[list(range(K * i, K * i + K)) for i in range(len(prompts))],
                           target=[target for _ in prompts])
    loss_fn, lcfg = LOSSES[loss_name(cfg.train)], loss_config(cfg.train)
    times = []
    for i in range(1 + spec["steps"]):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        metrics = backend.train_step([batch], loss_fn, lcfg)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    if cuda:
        measured = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        measured = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    p = plan(cfg, backend.model.get_base_model().config, budget_bytes=2**50,
             backend=spec["device"])
    predicted = p.peak_stage.total / 2**20 + (0 if cuda else p.runtime_bytes / 2**20)
    return {**spec, "threads": threads, "step_s": times, "step_s_median":
            statistics.median(times), "measured_mb": measured, "predicted_mb": predicted,
            "predicted_stage": p.peak_stage.name, "loss": metrics["loss"],
            "quant_format": backend.quant_format,
            "device_name": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="qwen2.5-0.5b")
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="", help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--quant", default="nf4", choices=["none", "nf4"])
    ap.add_argument("--rows", type=int, default=8, help="completions per step (DPO: 2/pair)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--completion-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    spec = {"model_dir": str(tiny_dir() if args.model == "tiny" else model_dir(args.model)),
            "device": args.device, "quant": args.quant,
            "dtype": args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
            "rows": args.rows, "prompt_len": args.prompt_len,
            "completion_len": args.completion_len, "steps": args.steps, "gc": args.gc,
            "threads": args.threads}
    print(f"[bench] QLoRA steps: {args.model} on {args.device}, quant {args.quant}, "
          f"{args.rows} rows x ({args.prompt_len}+{args.completion_len}) tokens, "
          f"checkpointing {args.gc}; load average {load_average()}", flush=True)
    print("| case | step s (median) | measured MiB | planner MiB | planner/measured |")
    print("|---|---|---|---|---|")
    results = []
    for case in args.cases.split(","):
        out = run_child(__file__, {**spec, "case": case})
        if "error" in out:
            raise SystemExit(f"[bench] {case} failed:\n{out['error']}")
        results.append(out)
        print(f"| {case} | {out['step_s_median']:.3f} | {out['measured_mb']:.0f} | "
              f"{out['predicted_mb']:.0f} | {out['predicted_mb'] / out['measured_mb']:.2f} |",
              flush=True)
    if results:
        print(f"device: {results[0]['device_name']}; quant format {results[0]['quant_format']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def tiny_dir() -> Path:
    """A tiny random Llama for checking this script on a CPU (tests/tiny.py builds it)."""
    from edge_pu.quant.cache import cache_root

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import save_tiny_model

    out = cache_root() / "bench" / "tiny-llama"
    if not (out / "config.json").exists():
        save_tiny_model(out, "llama")
    return out


if __name__ == "__main__":
    main()
