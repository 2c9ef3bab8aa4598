"""Benchmark: one DPO optimizer step, edge_pu's backend.train_step vs TRL's DPOTrainer.

    python bench/dpo_step.py [--model smollm2|qwen2.5-0.5b|qwen2.5-1.5b|DIR] [--device cpu|cuda]
        [--pairs 4] [--prompt-len 64] [--completion-len 64] [--steps 4] [--warmup 1]
        [--rounds 1] [--threads 1] [--gc] [--json OUT.json]

Same model (fp32 on CPU, bf16 on CUDA), same LoRA (r 16, alpha 32, dropout 0, the 7 attention
and MLP projections), same batch (`--pairs` pairs in one micro-batch), same token lengths, AdamW
at lr 5e-4, grad-norm clip 1, beta 0.1, gradient checkpointing off unless --gc (then on for
both). The token lengths are exact on both sides: prompts and completions are strings of words
that are single tokens with a leading space, so TRL's own tokenization yields prompt-len +
completion-len tokens (its appended EOS counted); edge_pu gets the very ids TRL trained on.

Cases, each in its own child process (clean memory peaks):
- `edge_pu`: backend.train_step([batch], LOSSES["dpo"], ...) with reference log-probs computed
  beforehand, as edge_pu's trainer does (once per unit, outside the step). The reference pass
  for the batch (backend.logprobs(adapter=False)) is timed separately as `ref_seconds`.
- `trl`: DPOTrainer with a PEFT model and no ref model (reference = adapter disabled, computed
  inside every step: TRL's default).
- `trl-precomputed`: the same with precompute_ref_log_probs=True (reference pass before
  training; the step is then policy forward + backward + update only).
Step time: median over `--steps` steps after `--warmup` steps (TRL: TrainerCallback
on_step_begin -> on_step_end). Training memory: the peak host RSS during a step minus the RSS
right after the model was loaded (GPU: max_memory_allocated during the step).
Ratios printed: edge_pu (step + its ref pass) vs trl, and edge_pu step vs trl-precomputed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    load_average,
    median,
    model_dir,
    resident_rss_mb,
    run_child,
    set_threads,
    spread,
)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
LR, BETA = 5e-4, 0.1


def make_pairs(tok: Any, n: int, prompt_len: int, completion_len: int, seed: int = 0
               ) -> list[dict[str, str]]:
    """Text pairs whose tokenization is exactly (prompt_len, completion_len - 1 + EOS)."""
    words = []
    for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        if token.startswith("Ġ") and token[1:].isalpha() and len(token) > 3:
            if tok.encode(" " + token[1:], add_special_tokens=False) == [idx]:
                words.append(token[1:])
        if len(words) >= 2000:
            break
    rng = random.Random(seed)

    def text(m: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(m))

    return [{"prompt": text(prompt_len), "chosen": text(completion_len - 1),
             "rejected": text(completion_len - 1)} for _ in range(n)]


def _edge_pu(spec: dict[str, Any]) -> dict[str, Any]:
    from edge_pu.algo.losses import LOSSES, LossConfig
    from edge_pu.backends import TrainBatch, make_backend
    from edge_pu.config import load_config
    from edge_pu.measure import Stages

    cfg = load_config(None, base={
        "student": {"path": spec["model_dir"], "dtype": spec["dtype"],
                    "quant": spec.get("quant", "none")},
        "lora": {**LORA, "target_modules": TARGETS}, "backend": spec["device"],
        "train": {"lr": LR, "beta": BETA, "max_grad_norm": 1.0,
                  "gradient_checkpointing": spec["gc"]}})
    backend: Any = make_backend(spec["device"])
    backend.load(cfg)
    loaded = resident_rss_mb(backend.model)
    pairs = make_pairs(backend.tok, spec["pairs"], spec["prompt_len"], spec["completion_len"])
    eos = backend.tok.eos_token_id
    prompts = [backend.token_ids(p["prompt"]) for p in pairs]
    chosen = [backend.token_ids(p["chosen"]) + [eos] for p in pairs]
    rejected = [backend.token_ids(p["rejected"]) + [eos] for p in pairs]
    rows_p, rows_c = prompts + prompts, chosen + rejected
    n = len(pairs)
    stages = Stages()
    steps = []
    for i in range(spec["warmup"] + spec["steps"]):
        with stages.stage("ref"):
            ref = backend.logprobs(rows_p, rows_c, adapter=False)
        batch = TrainBatch(rows_p, rows_c, ref, pairs=[(j, n + j) for j in range(n)])
        with stages.stage("step"):
            backend.train_step([batch], LOSSES["dpo"], LossConfig(beta=BETA))
        if i >= spec["warmup"]:
            steps.append((stages.records[-2], stages.records[-1]))
    return {"steps": [{"seconds": s.seconds, "ref_seconds": r.seconds,
                       "peak_delta_mb": s.peak_delta_mb, "peak_rss_mb": s.peak_rss_mb,
                       "cuda_peak_mb": s.cuda_peak_mb} for r, s in steps],
            "rss_loaded_mb": loaded,
            "tokens": [len(p) + len(c) for p, c in zip(rows_p, rows_c, strict=True)]}


def _trl(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from edge_pu.measure import Stages

    dtype = getattr(torch, spec["dtype"])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    kwargs: dict[str, Any] = {}
    if spec.get("quant") == "nf4":  # QLoRA on both sides: the same bitsandbytes settings
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": spec["device"]}
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype, **kwargs)
    loaded = resident_rss_mb(model)
    pairs = make_pairs(tok, spec["pairs"], spec["prompt_len"], spec["completion_len"])
    total = spec["warmup"] + spec["steps"]
    stages = Stages()

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.threads = torch.get_num_threads()  # the trainer stack must not change it
            self.ctx = stages.stage("step")
            self.ctx.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ctx.__exit__(None, None, None)

    out_dir = tempfile.mkdtemp(prefix="trl-bench-")
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=spec["pairs"], max_steps=total,
        learning_rate=LR, beta=BETA, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        gradient_checkpointing=spec["gc"], bf16=spec["dtype"] == "bfloat16",
        use_cpu=spec["device"] == "cpu", precompute_ref_log_probs=spec["precompute"],
        max_length=None, logging_steps=10**6, save_strategy="no", report_to=[],
        dataloader_num_workers=0, seed=0, disable_dropout=True)
    trainer = DPOTrainer(
        model=model, args=args, processing_class=tok,
        train_dataset=Dataset.from_list(pairs * total),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                               lora_dropout=LORA["dropout"], target_modules=TARGETS,
                               task_type="CAUSAL_LM"),
        callbacks=[timer := Timer()])
    row = trainer.train_dataset[0]
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    timed = stages.records[spec["warmup"]:]
    return {"steps": [{"seconds": s.seconds, "peak_delta_mb": s.peak_delta_mb,
                       "peak_rss_mb": s.peak_rss_mb, "cuda_peak_mb": s.cuda_peak_mb}
                      for s in timed],
            "train_wall_seconds": wall, "threads_in_step": timer.threads,
            "rss_loaded_mb": loaded,
            "tokens": [len(row["prompt_ids"]) + len(row["chosen_ids"]),
                       len(row["prompt_ids"]) + len(row["rejected_ids"])]}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    threads = set_threads(spec["threads"])
    out = _edge_pu(spec) if spec["case"] == "edge_pu" else _trl(spec)
    return {**spec, "threads": threads, **out}


CASES = {"edge_pu": {}, "trl": {"precompute": False}, "trl-precomputed": {"precompute": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="", help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per child")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=1, help="child processes per case")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing on (both)")
    ap.add_argument("--quant", default="none", choices=["none", "nf4"],
                    help="nf4: QLoRA (bitsandbytes NF4, double quant) for both engines")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    spec = {"model_dir": str(model_dir(args.model)), "device": args.device,
            "dtype": args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
            "pairs": args.pairs, "prompt_len": args.prompt_len, "quant": args.quant,
            "completion_len": args.completion_len, "steps": args.steps, "warmup": args.warmup,
            "threads": args.threads, "gc": args.gc, "precompute": False}
    print(f"[bench] DPO step: {args.model} on {args.device} ({spec['dtype']}), {args.pairs} "
          f"pairs x ({args.prompt_len} + {args.completion_len}) tokens, LoRA r{LORA['r']} on "
          f"{len(TARGETS)} projections, gc={args.gc}, threads={args.threads}; load average "
          f"{load_average()}", flush=True)
    cases = args.cases.split(",")
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for rnd in range(args.rounds):
        for case in cases:
            out = run_child(__file__, {**spec, **CASES[case], "case": case})
            if "error" in out:
                print(f"[bench] {case} failed:\n{out['error']}", flush=True)
                continue
            results[case].append(out)
            print(f"  round {rnd + 1} {case:16s} step s "
                  f"{', '.join(str(s['seconds']) for s in out['steps'])}; tokens per row "
                  f"{sorted(set(out['tokens']))}; torch threads in the step "
                  f"{out.get('threads_in_step', out['threads'])}", flush=True)
    summary = _summarise(results, args.device)
    print(summary["text"])
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "results": results,
                                               "summary": summary}, indent=2))


def _summarise(results: dict[str, list[dict[str, Any]]], device: str) -> dict[str, Any]:
    """Memory on CPU: the peak RSS during a step minus the RSS right after the model (and for
    edge_pu its LoRA adapter) was loaded. The RSS a step adds over the RSS at its own start is
    not comparable across processes: glibc keeps freed heap, so a process that kept the last
    step's memory shows a small increase. On CUDA: max_memory_allocated during the step."""
    rows: dict[str, dict[str, float]] = {}
    unit = "GPU MB (max allocated)" if device == "cuda" else "MB (peak RSS - RSS after load)"
    lines = [f"| case | step s median (range) | ref pass s | training memory, {unit} "
             "| peak RSS MB | RSS after load MB |", "|---|---|---|---|---|---|"]
    for case, outs in results.items():
        steps = [(s, o["rss_loaded_mb"]) for o in outs for s in o["steps"]]
        if not steps:
            continue
        secs = [s["seconds"] for s, _ in steps]
        ref = [s["ref_seconds"] for s, _ in steps if "ref_seconds" in s]
        mem = [s["cuda_peak_mb"] if device == "cuda" else s["peak_rss_mb"] - loaded
               for s, loaded in steps]
        rows[case] = {"seconds": median(secs), "ref_seconds": median(ref) if ref else 0.0,
                      "memory_mb": median(mem),
                      "peak_rss_mb": median([s["peak_rss_mb"] for s, _ in steps]),
                      "rss_loaded_mb": median([loaded for _, loaded in steps])}
        r = rows[case]
        lines.append(f"| {case} | {r['seconds']:.2f} ({spread(secs)}) | "
                     f"{r['ref_seconds']:.2f} | {r['memory_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['rss_loaded_mb']:.0f} |")
    ratios: dict[str, float] = {}
    e = rows.get("edge_pu")
    if e and "trl" in rows:
        t = rows["trl"]
        ratios["speed_vs_trl"] = t["seconds"] / (e["seconds"] + e["ref_seconds"])
        ratios["memory_vs_trl"] = e["memory_mb"] / max(t["memory_mb"], 1e-9)
        lines.append(f"\nedge_pu (step + ref pass) vs TRL (ref inside the step): speed "
                     f"{ratios['speed_vs_trl']:.2f}x, training memory "
                     f"{ratios['memory_vs_trl']:.2f}x")
    if e and "trl-precomputed" in rows:
        t = rows["trl-precomputed"]
        ratios["speed_vs_trl_precomputed"] = t["seconds"] / e["seconds"]
        ratios["memory_vs_trl_precomputed"] = e["memory_mb"] / max(t["memory_mb"], 1e-9)
        lines.append(f"edge_pu step vs TRL precompute_ref_log_probs step: speed "
                     f"{ratios['speed_vs_trl_precomputed']:.2f}x, training memory "
                     f"{ratios['memory_vs_trl_precomputed']:.2f}x")
    return {"cases": rows, **ratios, "text": "\n".join(lines)}


if __name__ == "__main__":
    main()
