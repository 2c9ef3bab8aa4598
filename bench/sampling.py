"""Benchmark: K sampled candidates per prompt, edge_pu's sampler vs HF `generate`.

    python bench/sampling.py [--model smollm2|qwen2.5-0.5b|qwen2.5-1.5b|DIR] [--device cpu|cuda]
        [--prompts 4] [--k 4] [--max-new-tokens 48] [--top-p 1.0] [--repeats 2] [--rounds 2]
        [--threads 1] [--dtype float32|bfloat16] [--llamacpp] [--import-as q8_0] [--json OUT.json]

Both engines sample from the same model object (the student edge_pu loads: base + a fresh LoRA
adapter, adapter on), the same prompts (chat-templated task-suite prompts), the same K,
temperature 1 and top-p, and exactly max_new_tokens tokens per candidate: HF with
min_new_tokens = max_new_tokens, edge_pu with its EOS list emptied (a bench-only override of
the backend's `eos_ids` attribute; the sampler has no ignore-EOS option). HF runs
`model.generate(do_sample=True, num_return_sequences=K)` on the left-padded batch, which
expands every prompt to K rows before the prefill; edge_pu prefills each prompt once.

Each (engine, round) is a child process: load, one short warm-up, then `--repeats` timed runs.
Reported per engine: median tokens/s over all timed runs (generated tokens only) and the median
sampling memory: the peak RSS during a run (high-water mark reset per run) minus the RSS right
after the model was loaded (on CUDA: torch.cuda.max_memory_allocated during the run). The
ratio line is edge_pu / HF from the same invocation, engines interleaved round by round so
that machine load drifts hit both. Each run also records its process CPU time: on a machine
other jobs load, tokens per CPU-second at `--threads 1` still compare the engines' work.

`--llamacpp` adds `sampling.engine: llama-cpp` on the student's own GGUF (Q4_1 for smollm2);
`--import-as q8_0` adds it on the student imported as q8_0 (`student.import_as`: the file whose
dequantized weights training then uses).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    interleaved,
    load_average,
    median,
    model_dir,
    resident_rss_mb,
    set_threads,
    spread,
    student_path,
)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    threads = set_threads(spec["threads"])
    import torch

    from edge_pu.backends import make_backend
    from edge_pu.config import SamplingConfig, load_config
    from edge_pu.demo import DEFAULTS
    from edge_pu.measure import Stages, rss_bytes
    from edge_pu.tasks import generate_tasks

    base = json.loads(json.dumps(DEFAULTS))
    base.update(student={"path": spec["model_dir"], "dtype": spec["dtype"]},
                backend=spec["device"])
    cfg = load_config(None, base=base)
    backend: Any = make_backend(spec["device"])
    backend.load(cfg)
    loaded = resident_rss_mb(backend.model)
    tasks = generate_tasks(spec["prompts"], seed=0)
    prompts = [backend.chat_ids([{"role": "user", "content": t.prompt}]) for t in tasks]
    k, top_p = spec["k"], spec["top_p"]

    def edge_pu(n_new: int) -> int:
        backend.eos_ids = []  # bench only: never stop early, so both engines make n_new tokens
        scfg = SamplingConfig(k=k, max_new_tokens=n_new, temperature=1.0, top_p=top_p,
                              prompt_batch=len(prompts))
        out = backend.sample(prompts, k, scfg, list(range(len(prompts))))
        return sum(len(s.token_ids) for row in out for s in row)

    def hf(n_new: int) -> int:
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), backend.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        torch.manual_seed(0)
        with torch.no_grad():
            out = backend.model.generate(
                input_ids=ids.to(backend.device), attention_mask=attn.to(backend.device),
                do_sample=True, temperature=1.0, top_p=top_p, top_k=0, num_return_sequences=k,
                max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=backend.pad_id)
        return int((out.shape[1] - width) * out.shape[0])

    def llamacpp(n_new: int) -> int:  # also the imported engine: same sampler, other file
        sampler.eos_ids = set()  # bench only, as for edge_pu above
        scfg = SamplingConfig(k=k, max_new_tokens=n_new, temperature=1.0, top_p=top_p)
        out = sampler.sample(prompts, k, scfg, list(range(len(prompts))))
        return sum(len(s.token_ids) for row in out for s in row)

    if spec["engine"].startswith("edge_pu-llamacpp"):
        import tempfile

        from edge_pu.backends.llamacpp_sampler import LlamaCppSampler
        from edge_pu.quant.student import resolve_student

        imp = spec["engine"].removeprefix("edge_pu-llamacpp").removeprefix("-")
        cfg = load_config(None, base={**base, "student": {"path": spec["student_path"],
                                                          "import_as": imp}})
        student_dir = resolve_student(spec["student_path"], imp)[0] if imp else \
            backend.student_dir
        sampler = LlamaCppSampler(cfg, student_dir, Path(tempfile.mkdtemp()),
                                  backend.eos_ids, backend.decode)
        loaded = rss_bytes() / 2**20
    run = edge_pu if spec["engine"] == "edge_pu" else hf if spec["engine"] == "hf" else llamacpp
    run(4)  # warm-up: first-call allocations and kernel selection
    stages = Stages()
    cpu = []
    for r in range(spec["repeats"]):
        with stages.stage(f"run{r}") as info:
            t0 = time.process_time()
            info["tokens"] = run(spec["max_new_tokens"])
            cpu.append(time.process_time() - t0)
    recs = stages.as_list()
    expected = len(prompts) * k * spec["max_new_tokens"]
    return {**spec, "threads": threads, "runs": [
        {"seconds": r["seconds"], "tokens": r["tokens"],
         "tokens_per_s": r["tokens"] / r["seconds"], "cpu_seconds": c,
         "tokens_per_cpu_s": r["tokens"] / max(c, 1e-9), "peak_delta_mb": r["peak_delta_mb"],
         "peak_rss_mb": r["peak_rss_mb"], "cuda_peak_mb": r["cuda_peak_mb"],
         "memory_mb": r["peak_rss_mb"] - loaded} for r, c in zip(recs, cpu, strict=True)],
        "equal_lengths": all(r["tokens"] == expected for r in recs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="", help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per child process")
    ap.add_argument("--rounds", type=int, default=2, help="child processes per engine")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--llamacpp", action="store_true",
                    help="also time sampling.engine=llama-cpp (CPU: the student's GGUF + LoRA)")
    ap.add_argument("--import-as", default="", choices=["", "q8_0", "q4_0", "f16"],
                    help="also time llama.cpp on the student imported as this GGUF type")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))), flush=True)
        return
    spec = {"model_dir": str(model_dir(args.model)), "device": args.device,
            "dtype": args.dtype or ("bfloat16" if args.device == "cuda" else "float32"),
            "prompts": args.prompts, "k": args.k, "max_new_tokens": args.max_new_tokens,
            "top_p": args.top_p, "repeats": args.repeats, "threads": args.threads}
    print(f"[bench] sampling: {args.model} on {args.device}, {args.prompts} prompts x K={args.k}"
          f" x {args.max_new_tokens} tokens, top_p={args.top_p}, threads={args.threads}; "
          f"load average {load_average()}", flush=True)
    engines = ["edge_pu", "hf"] + (["edge_pu-llamacpp"] if args.llamacpp else []) + (
        [f"edge_pu-llamacpp-{args.import_as}"] if args.import_as else [])
    if args.llamacpp or args.import_as:
        spec["student_path"] = str(student_path(args.model))

    def line(out: dict[str, Any]) -> str:
        tps = [r["tokens_per_s"] for r in out["runs"]]
        cps = [r["tokens_per_cpu_s"] for r in out["runs"]]
        return (f"tokens/s {', '.join(f'{x:.1f}' for x in tps)}  per CPU-s "
                f"{', '.join(f'{x:.1f}' for x in cps)}  equal lengths: {out['equal_lengths']}")

    results = interleaved(__file__, spec, engines, args.rounds, line)
    summary = _summarise(results, args.device)
    print(summary["text"])
    if args.json:
        Path(args.json).write_text(json.dumps({"spec": spec, "results": results,
                                               "summary": summary}, indent=2))


def _summarise(results: dict[str, list[dict[str, Any]]], device: str) -> dict[str, Any]:
    mem_key = "cuda_peak_mb" if device == "cuda" else "memory_mb"
    unit = "GPU MB (max allocated)" if device == "cuda" else "MB (peak RSS - RSS after load)"
    rows: dict[str, dict[str, Any]] = {}
    lines = [f"| engine | tokens/s median (range) | tokens per CPU-s median (range) | "
             f"sampling memory, {unit} | peak RSS MB |", "|---|---|---|---|---|"]
    for engine, outs in results.items():
        runs = [r for o in outs for r in o["runs"]]
        tps = [r["tokens_per_s"] for r in runs]
        cps = [r["tokens_per_cpu_s"] for r in runs]
        mem = [r[mem_key] for r in runs]
        peak = [r["peak_rss_mb"] for r in runs]
        rows[engine] = {"tokens_per_s": median(tps), "tokens_per_cpu_s": median(cps),
                        "memory_mb": median(mem), "peak_rss_mb": median(peak),
                        "runs": len(runs)}
        lines.append(f"| {engine} | {median(tps):.1f} ({spread(tps)}) | {median(cps):.1f} "
                     f"({spread(cps)}) | {median(mem):.0f} | {median(peak):.0f} |")
    ratios = {}
    for engine in rows:
        if engine == "hf":
            continue
        speed = rows[engine]["tokens_per_s"] / rows["hf"]["tokens_per_s"]
        cpu_speed = rows[engine]["tokens_per_cpu_s"] / rows["hf"]["tokens_per_cpu_s"]
        memory = rows[engine]["memory_mb"] / max(rows["hf"]["memory_mb"], 1e-9)
        ratios[engine] = {"speed": speed, "cpu_speed": cpu_speed, "memory": memory}
        lines.append(f"\nratio {engine} / HF generate: speed {speed:.2f}x (per CPU-second "
                     f"{cpu_speed:.2f}x), sampling memory {memory:.2f}x")
    return {"engines": rows, "speed_ratio": ratios["edge_pu"]["speed"],
            "memory_ratio": ratios["edge_pu"]["memory"], "ratios": ratios,
            "text": "\n".join(lines)}


if __name__ == "__main__":
    main()
