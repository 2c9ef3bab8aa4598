"""Does the pipeline leave a real student better on IFEval? The issue-25 evaluation, one command.

    .venv/bin/edge-pu fetch qwen-0.5b && .venv/bin/edge-pu fetch qwen-1.5b
    .venv/bin/python bench/ifeval_lift.py --out runs/ifeval-lift --seeds 2 \\
        --methods none sft sft+pu-grpo-adv sft+verifier teacher

Serves the teacher GGUF (default: Qwen2.5-Coder-1.5B-Instruct) with llama.cpp's OpenAI server
on a free loopback port for the whole run (it anchors the workload's training prompts, once
each, and answers the `teacher` row), then runs `edge-pu eval --suite workload --benchmark
ifeval` on the student (default Qwen2.5-Coder-0.5B-Instruct) with every greedy answer and every
candidate through llama.cpp. Reruns resume from the folder. Extra `--set` go to the eval.
Prints the anchors' constraint pass share and writes OUT/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from edge_pu.eval import EvalOptions, run_eval
from edge_pu.fetch import resolve_model_name
from edge_pu.teachers.llama_server import llama_server

SETTINGS = [  # the workload's eval settings (chosen for a 2-core CPU; see bench/eval-results)
    "sampling.engine=llama-cpp", "sampling.k=4", "sampling.max_new_tokens=160",
    "sampling.prompt_batch=8", "student.max_length=640", "teacher.kind=openai",
    "teacher.model=qwen2.5-coder-1.5b-instruct", "teacher.max_tokens=200",
    "teacher.timeout_s=600", "train.steps=24", "train.batch_size=8", "train.micro_batch=4",
    "sft.batch_size=8", "sft.micro_batch=4", "ranker.batch_size=8",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", default="qwen-0.5b")
    ap.add_argument("--teacher", default="qwen-1.5b")
    ap.add_argument("--out", default="runs/ifeval-lift")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["none", "sft", "sft+pu-grpo-adv",
                                                     "sft+verifier", "teacher"])
    ap.add_argument("--rankers", nargs="+", default=["recall", "reward"])
    ap.add_argument("--ifeval-prompts", type=int, default=270)
    ap.add_argument("--ifeval-max-new-tokens", type=int, default=256)
    ap.add_argument("--train-per-family", type=int, default=0)
    ap.add_argument("--heldout-per-family", type=int, default=0)
    ap.add_argument("--validation-per-family", type=int, default=0)
    ap.add_argument("--pu-steps", type=int, default=0)
    ap.add_argument("--teacher-threads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args(argv)
    out = Path(a.out)
    gguf = resolve_model_name(a.teacher, "--teacher")
    with llama_server(gguf, alias="qwen2.5-coder-1.5b-instruct", log=out / "teacher_server.log",
                      n_threads=a.teacher_threads, n_ctx=4096) as server:
        print(f"[bench] teacher {gguf} at {server.base_url}", flush=True)
        opts = EvalOptions(
            student=a.student, methods=tuple(a.methods), rankers=tuple(a.rankers),
            seeds=a.seeds, out=str(out), suite="workload", benchmark="ifeval",
            ifeval_prompts=a.ifeval_prompts, ifeval_max_new_tokens=a.ifeval_max_new_tokens,
            train_per_family=a.train_per_family, heldout_per_family=a.heldout_per_family,
            validation_per_family=a.validation_per_family, pu_steps=a.pu_steps,
            threads=a.threads, tune=a.tune,
            overrides=(*SETTINGS, f"teacher.base_url={server.base_url}", *a.overrides))
        res = run_eval(dataclasses.replace(opts))
    print(json.dumps({"anchors": res["suite"].get("anchors"), "seconds": res["seconds"]},
                     indent=1))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
