"""Data-parallel speed-up on CPU: `torchrun --nproc-per-node 2` (1 thread each) against one
process with 2 threads, same config, same global batch (issue 17).

    python bench/distributed_speedup.py [--prompts 32] [--hidden 256] [--layers 4] [--repeat 2]

Builds a random-weight Llama student in a temp dir (tests/tiny.py: byte-level BPE tokenizer,
ChatML template), writes answers for a `file` teacher, and runs `edge-pu run` twice from a
fresh run dir: `OMP_NUM_THREADS=2 python -m edge_pu run` and `OMP_NUM_THREADS=1 python -m
torch.distributed.run --standalone --nproc-per-node 2 -m edge_pu run`. Prints each run's wall
time (process start to exit, imports and model load included), rank 0's pipeline time
(summary.json) and the PU steps' time (metrics.jsonl), and checks the two produced the same
candidates. With --repeat R the pair runs R times, the order swapped each time, so a change in
the machine's load between the two runs shows as disagreement between the repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _config(root: Path, student: Path, run_dir: Path, n: int) -> Path:
    prompts, answers = root / "prompts.jsonl", root / "answers.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"say {i} twice"}) + "\n"
                               for i in range(n)))
    answers.write_text("".join(json.dumps({"prompt": f"say {i} twice",
                                           "anchor": f"{i} {i} is the answer"}) + "\n"
                               for i in range(n)))
    cfg = root / f"{run_dir.name}.yaml"
    cfg.write_text(f"""
student: {{path: {student}}}
teacher: {{kind: file, path: {answers}}}
data: {{prompts: {prompts}}}
sampling: {{k: 4, max_new_tokens: 32, prompt_batch: 4}}
ranker: {{batch_size: 8}}
sft: {{steps: 8, batch_size: 8, micro_batch: 2, lr: 0.001}}
train: {{steps: 8, batch_size: 4, micro_batch: 2, rounds: 1, lr: 0.0001}}
backend: cpu
run_dir: {run_dir}
""")
    return cfg


def _timed(cmd: list[str], threads: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        student = save_tiny_model(root / "student", "llama", hidden_size=args.hidden,
                                  intermediate_size=4 * args.hidden,
                                  num_hidden_layers=args.layers, num_attention_heads=4,
                                  num_key_value_heads=2)
        print(f"student: Llama hidden {args.hidden}, {args.layers} layers; {args.prompts} "
              "prompts, K=4, 32 new tokens, 8 SFT + 8 GRPO steps", flush=True)
        pair = [("1 process x 2 threads", 2, [sys.executable, "-m", "edge_pu", "run"]),
                ("2 processes x 1 thread", 1, [sys.executable, "-m", "torch.distributed.run",
                                               "--standalone", "--nproc-per-node=2", "-m",
                                               "edge_pu", "run"])]
        for rep in range(args.repeat):
            rows = {}
            for name, threads, cmd in (pair if rep % 2 == 0 else pair[::-1]):
                run_dir = root / f"{name.split()[0]}-{rep}"
                wall = _timed([*cmd, str(_config(root, student, run_dir, args.prompts))],
                              threads)
                metrics = [json.loads(x) for x in
                           (run_dir / "metrics.jsonl").read_text().splitlines()]
                train_s = sum(m.get("seconds", 0.0) for m in metrics if "step" in m)
                summary = json.loads((run_dir / "summary.json").read_text())
                cands = [(c["prompt_id"], c["k"], c["token_ids"]) for c in map(
                    json.loads, (run_dir / "candidates.jsonl").read_text().splitlines())]
                rows[name] = (wall, summary["seconds"], train_s, cands)
                print(f"[{rep}] {name:<24} wall {wall:6.1f} s   pipeline "
                      f"{summary['seconds']:6.1f} s   PU train steps {train_s:5.1f} s",
                      flush=True)
            one, two = rows[pair[0][0]], rows[pair[1][0]]
            print(f"[{rep}] speed-up: wall {one[0] / two[0]:.2f}x, pipeline "
                  f"{one[1] / two[1]:.2f}x, PU steps {one[2] / two[2]:.2f}x; same candidates: "
                  f"{one[3] == two[3]}", flush=True)


if __name__ == "__main__":
    main()
