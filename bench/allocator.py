"""glibc mmap threshold vs sampling and scoring speed on the CPU backend (one setting per run).

    python bench/allocator.py SETTING [--model smollm2]
    SETTING: 4 (MiB, the default edge_pu pins), 0.125 (the old 128 KiB), or `default` (glibc's
    dynamic threshold: no pinning)

Loads the student (which pins the allocator), samples 8 task prompts x K=4 x 32 tokens (EOS
ignored) and scores the 32 completions under the reference; prints seconds, minor page faults
and system CPU seconds of each stage, and the process's peak RSS. Run each setting in its own
process, alternating, at least twice: the machine's load moves the seconds.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import model_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("setting")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--train", action="store_true",
                    help="instead: 6 DPO steps of 4 pairs (10-40 random completion tokens)")
    args = ap.parse_args()
    import os

    # Read by edge_pu.planner.cpu_allocator_threshold when the backend loads; 0 = glibc's own.
    os.environ["EDGE_PU_MMAP_THRESHOLD"] = "0" if args.setting == "default" else str(
        int(float(args.setting) * 2**20))
    from edge_pu.backends import make_backend
    from edge_pu.config import SamplingConfig, load_config
    from edge_pu.demo import DEFAULTS
    from edge_pu.tasks import generate_tasks

    cfg = load_config(None, base={"student": {"path": str(model_dir(args.model))},
                                  "backend": "cpu", "lora": DEFAULTS["lora"]})
    b: object = make_backend("cpu")
    b.load(cfg)  # type: ignore[attr-defined]
    ids = [b.chat_ids([{"role": "user", "content": t.prompt}])  # type: ignore[attr-defined]
           for t in generate_tasks(8, seed=0)]
    if args.train:
        _train(b, ids)
        return
    b.eos_ids = []  # type: ignore[attr-defined]
    b.sample(ids[:2], 4, SamplingConfig(k=4, max_new_tokens=4), [0, 1])  # type: ignore
    sc = SamplingConfig(k=4, max_new_tokens=32, temperature=1.0, top_p=0.95, prompt_batch=8)

    def usage() -> tuple[int, float, float]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_minflt, r.ru_stime, time.perf_counter()

    f0, s0, t0 = usage()
    out = b.sample(ids, 4, sc, list(range(8)))  # type: ignore[attr-defined]
    f1, s1, t1 = usage()
    comps = [s.token_ids for row in out for s in row]
    b.logprobs([p for p in ids for _ in range(4)], comps, adapter=False)  # type: ignore
    f2, s2, t2 = usage()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"threshold {args.setting}: sample {t1 - t0:.1f} s ({f1 - f0} faults, sys "
          f"{s1 - s0:.1f} s) | reference log-probs {t2 - t1:.1f} s ({f2 - f1} faults, sys "
          f"{s2 - s1:.1f} s) | peak RSS {peak:.0f} MB")


def _train(b: object, ids: list[list[int]]) -> None:
    import random

    from edge_pu.algo.losses import LOSSES, LossConfig
    from edge_pu.backends import TrainBatch

    rng, times = random.Random(0), []
    for step in range(6):
        prompts = [ids[(4 * step + i) % len(ids)] for i in range(4) for _ in (0, 1)]
        comps = [[rng.randrange(100, 40000) for _ in range(rng.randint(10, 40))] for _ in range(8)]
        ref = b.logprobs(prompts, comps, adapter=False)  # type: ignore[attr-defined]
        batch = TrainBatch(prompts, comps, ref, pairs=[(2 * i, 2 * i + 1) for i in range(4)])
        t0 = time.perf_counter()
        b.train_step([batch], LOSSES["dpo"], LossConfig())  # type: ignore[attr-defined]
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"DPO steps s: {' '.join(f'{t:.2f}' for t in times)} | peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
