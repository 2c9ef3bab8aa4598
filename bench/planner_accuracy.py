"""Planner accuracy on CPU: predicted vs measured peak RSS of one training step.

    python bench/planner_accuracy.py              # every case, each in a fresh python process
    python bench/planner_accuracy.py --fast       # forked from one pre-imported process (tests)
    python bench/planner_accuracy.py --no-pin     # glibc's default allocator behaviour

Each case is a random-weight Llama or Qwen2 student (weights drawn with numpy and written as
safetensors, so building one runs no torch kernel). A measured process loads it through the
torch CPU backend, computes the reference log-probs of its DPO pairs
(edge_pu.train.attach_logprobs) and takes one optimizer step (edge_pu.train.to_batch,
LOSSES["dpo"]): the `load`, `reference` and `train` stages of a run. It calls
edge_pu.planner.pin_cpu_allocator() first, as the prediction assumes (see its docstring).
Measured = the process's ru_maxrss: absolute RSS, the torch runtime included. Predicted =
edge_pu.planner.RUNTIME_BYTES["cpu"] + the largest of those three stages. The BASELINE case (a
64-wide model) measures the runtime itself. Rows are padded (each rejected completion is one
token shorter) as real batches are. Llama cases tie the embeddings: an untied embedding's rows
that no token uses stay unread in the memory-mapped file and never count in RSS.

--fast forks every case from one process that has imported torch, transformers and peft, so the
imports are paid once. A forked child lacks the file pages that only the imports touched, so in
that mode predicted = the BASELINE case's measured peak + the model's stages (runtime excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# arch; dims = (hidden, intermediate, layers, heads, kv heads, vocab); student dtype; LoRA
# targets; max_length T; completion tokens C; micro_batch (pairs); gradient checkpointing
CASES: list[dict[str, Any]] = [
    dict(name="weights-fp32", arch="llama", dims=(384, 1024, 2, 6, 2, 49152), dtype="float32",
         targets=["q_proj", "v_proj"], T=24, C=8, mb=1, gc=False),
    dict(name="activations-fp32", arch="qwen2", dims=(64, 172, 16, 4, 2, 2048),
         dtype="float32", targets=["q_proj", "k_proj", "v_proj", "o_proj"], T=256, C=64,
         mb=4, gc=False),
    dict(name="logits-checkpointed", arch="llama", dims=(64, 172, 4, 4, 2, 65536),
         dtype="float32", targets=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
         T=320, C=128, mb=1, gc=True),
    # slower (minutes on 2 shared cores); not in the tests
    dict(name="wide-activations", arch="llama", dims=(384, 1024, 4, 6, 2, 8192),
         dtype="float32", targets=["q_proj", "v_proj"], T=384, C=192, mb=4, gc=False),
    dict(name="bf16-converted", arch="llama", dims=(256, 768, 4, 4, 2, 65536),
         dtype="bfloat16", targets=["q_proj", "v_proj"], T=256, C=128, mb=2, gc=False),
]
FAST_CASES = ("weights-fp32", "activations-fp32", "logits-checkpointed")
BASELINE = dict(name="baseline", arch="llama", dims=(64, 128, 2, 4, 2, 512), dtype="float32",
                targets=["q_proj", "v_proj"], T=32, C=16, mb=1, gc=False)
PRELOAD = ("torch", "transformers", "peft", "edge_pu.backends.torch_backend")


def case_config(case: dict[str, Any], model_dir: str) -> Any:
    from edge_pu.config import build_config

    return build_config([("bench", {
        "student": {"path": model_dir, "dtype": case["dtype"], "max_length": case["T"]},
        "sampling": {"max_new_tokens": case["C"]},
        "ranker": {"batch_size": 2 * case["mb"]},
        "train": {"algorithm": "dpo", "micro_batch": case["mb"], "batch_size": case["mb"],
                  "gradient_checkpointing": case["gc"]},  # the DPO step measured below
        "lora": {"r": 8, "target_modules": case["targets"]}})])


def build_model(case: dict[str, Any], root: Path) -> str:
    """Write an HF model dir of the case's shape; numpy draws the weights (no torch kernels)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_config, tiny_tokenizer

    h, inter, layers, heads, kv, vocab = case["dims"]
    tok = tiny_tokenizer()
    cfg = tiny_config(case["arch"], vocab, hidden_size=h, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, max_position_embeddings=4096)
    cfg.eos_token_id, cfg.pad_token_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if cfg.tie_word_embeddings \
        else set()
    rng = np.random.default_rng(0)
    tensors = {}
    for name, p in model.state_dict().items():
        if name in tied:
            continue
        shape = tuple(p.shape)
        tensors[name] = (np.ones(shape, np.float32) if name.endswith("norm.weight") else
                         rng.standard_normal(shape, np.float32) * np.float32(0.05))
    out = root / case["name"]
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)
    GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
                     ).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def run_case(case: dict[str, Any], model_dir: str, pin: bool = True) -> dict[str, float]:
    """The measured work: load, reference log-probs, one DPO step. Returns ru_maxrss bytes."""
    import random

    from edge_pu.algo.losses import LOSSES
    from edge_pu.backends.torch_backend import CPUBackend
    from edge_pu.planner import TIGHT_MMAP_THRESHOLD, pin_cpu_allocator
    from edge_pu.train import Unit, attach_logprobs, loss_config, to_batch

    # The tight setting the predictions assume (the backend's load keeps it), or none at all.
    os.environ["EDGE_PU_MMAP_THRESHOLD"] = str(TIGHT_MMAP_THRESHOLD if pin else 0)
    if pin:
        pin_cpu_allocator()
    if case.get("threads"):
        import torch

        torch.set_num_threads(case["threads"])
    t0 = time.time()
    cfg = case_config(case, model_dir)

    def maxrss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    backend = CPUBackend()
    backend.load(cfg)
    out: dict[str, float] = {"load": maxrss()}
    rng = random.Random(0)
    P, C = case["T"] - case["C"], case["C"]
    units = [Unit(str(i), [rng.randrange(3, 500) for _ in range(P)],
                  [[rng.randrange(3, 500) for _ in range(C)],
                   [rng.randrange(3, 500) for _ in range(C - 1)]]) for i in range(case["mb"])]
    attach_logprobs(backend, units, need_old=False, batch=cfg.ranker.batch_size)
    out["reference"] = maxrss()
    backend.train_step([to_batch(units, 1.0, False)], LOSSES["dpo"], loss_config(cfg.train))
    out["train"] = maxrss()
    out["seconds"] = round(time.time() - t0, 1)
    return out


def predict(case: dict[str, Any], model_dir: str) -> dict[str, int]:
    """Each measured stage as `edge_pu.planner` predicts it, runtime excluded (bytes)."""
    from edge_pu.model_shape import read_model_shape
    from edge_pu.planner import Settings, stages

    cfg = case_config(case, model_dir)
    st = Settings(case["T"], case["mb"], case["gc"], cfg.ranker.batch_size, cfg.sampling.k)
    by = {s.name: s.total for s in stages(cfg, read_model_shape(model_dir), st)}
    return {k: by[k] for k in ("load", "reference", "train")}


def _python(*args: str) -> Any:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"planner_accuracy {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _serve(cases: list[dict[str, Any]], root: str, pin: bool) -> list[dict[str, Any]]:
    """Import once, build every model, then fork one child per case, one after the other.
    Nothing here runs a torch kernel, so no OpenMP thread pool is inherited by a child."""
    import importlib

    for mod in PRELOAD:
        importlib.import_module(mod)
    dirs = [build_model(c, Path(root)) for c in cases]
    out = []
    for case, model_dir in zip(cases, dirs, strict=True):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report through the pipe, never return
            os.close(read)
            try:
                got: dict[str, Any] = dict(run_case(case, model_dir, pin))
            except BaseException as exc:  # noqa: B036 - reported to the parent instead
                got = {"error": repr(exc)}
            os.write(write, json.dumps(got).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            got = json.loads(f.read() or '{"error": "the child died"}')
        os.waitpid(pid, 0)
        if "error" in got:
            raise RuntimeError(f"case {case['name']}: {got['error']}")
        out.append({**got, "dir": model_dir})
    return out


def compare(cases: list[dict[str, Any]], *, fast: bool, pin: bool = True, threads: int = 0
            ) -> list[dict[str, Any]]:
    """Measure each case (plus BASELINE) and pair it with the prediction; bytes. threads > 0
    sets torch's thread count in the measured processes (1 keeps tests quick on a loaded box:
    OpenMP barriers crawl when the cores are oversubscribed)."""
    from edge_pu.planner import RUNTIME_BYTES

    cases = [{**c, "threads": threads} for c in (BASELINE, *cases)]
    with tempfile.TemporaryDirectory() as root:
        if fast:
            got = _python("--serve", json.dumps(cases), root, str(pin))
        else:  # build in one process, then measure each case in a fresh one
            dirs = _python("--build", json.dumps(cases), root)
            got = [_python("--child", json.dumps(c), d, str(pin))
                   for c, d in zip(cases, dirs, strict=True)]
        preds = [predict(c, g["dir"]) for c, g in zip(cases, got, strict=True)]
    runtime = got[0]["train"] - max(preds[0].values()) if fast else RUNTIME_BYTES["cpu"]
    rows = []
    for case, meas, pred in zip(cases, got, preds, strict=True):
        stage = max(pred, key=lambda k: pred[k])
        rows.append({"case": case["name"], "stage": stage, "predicted": runtime + pred[stage],
                     "measured": meas["train"], "seconds": meas["seconds"],
                     "ratio": (runtime + pred[stage]) / meas["train"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--fast", action="store_true", help="fork the cases from one process")
    ap.add_argument("--no-pin", action="store_true", help="leave glibc's mmap threshold dynamic")
    ap.add_argument("--case", action="append", default=[], help="run only this case")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.build:
        print(json.dumps([build_model(c, Path(args.build[1])) for c in json.loads(args.build[0])]))
        return
    if args.child:
        case, model_dir, pin = json.loads(args.child[0]), args.child[1], args.child[2] == "True"
        print(json.dumps({**run_case(case, model_dir, pin), "dir": model_dir}))
        return
    if args.serve:
        print(json.dumps(_serve(json.loads(args.serve[0]), args.serve[1],
                                args.serve[2] == "True")))
        return
    cases = [c for c in CASES if c["name"] in args.case] if args.case else CASES
    rows = compare(cases, fast=args.fast, pin=not args.no_pin, threads=args.threads)
    print(f"{'case':<20} {'stage':<10} {'predicted MiB':>14} {'measured MiB':>13} {'ratio':>6}"
          f" {'s':>5}")
    for r in rows:
        print(f"{r['case']:<20} {r['stage']:<10} {r['predicted'] / 2**20:>14.1f} "
              f"{r['measured'] / 2**20:>13.1f} {r['ratio']:>6.3f} {r['seconds']:>5}")


if __name__ == "__main__":
    main()
