"""Export a demo run's adapter and gate it on the demo's held-out prompts.

    python bench/export_gate.py RUN_DIR FORMAT [QUANT]     # e.g. runs/demo gguf f16

RUN_DIR is an `edge-pu demo` run (its tasks.jsonl, train_prompts.jsonl and adapter/). The
merged student is exported to RUN_DIR/export/FORMAT[-QUANT] and checked in its own runtime
against the merged torch model on every held-out prompt with the demo's greedy length
(edge_pu.export.export); prints the gate's checks and how many greedy answers are identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from edge_pu.demo import EVAL_MAX_NEW_TOKENS, find_demo_student
from edge_pu.export import export
from edge_pu.jsonl import read_jsonl


def main() -> None:
    if len(sys.argv) not in (3, 4):
        raise SystemExit(__doc__)
    run, fmt = Path(sys.argv[1]), sys.argv[2]
    quant = sys.argv[3] if len(sys.argv) == 4 else None
    train = {r["id"] for r in read_jsonl(run / "train_prompts.jsonl")}
    held = [r["prompt"] for r in read_jsonl(run / "tasks.jsonl") if r["id"] not in train]
    print(f"[gate] {len(held)} held-out prompts, {EVAL_MAX_NEW_TOKENS} greedy tokens", flush=True)
    out = run / "export" / (fmt + (f"-{quant}" if quant else ""))
    report = export((str(find_demo_student()), run / "adapter"), fmt, out, quant=quant,
                    prompts=held, n_greedy=EVAL_MAX_NEW_TOKENS)
    same = sum(p["reference_greedy"] == p["artifact_greedy"] for p in report["prompts"])
    print(json.dumps({"passed": report["passed"], "checks": report["checks"]}, indent=1))
    print(f"[gate] identical greedy answers: {same} of {len(report['prompts'])}")


if __name__ == "__main__":
    main()
