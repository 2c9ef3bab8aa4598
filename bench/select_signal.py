"""Does `train.select: spread` find the prompts worth the PU budget? An analysis of an eval folder.

    python bench/select_signal.py RUNS/EVAL [--budget 24]

For each seed's SFT-checkpoint candidates (`seed-S/shared-sft/`, written by `edge-pu eval` with
the `oracle` ranker among its rankers), compares the `budget` prompts with the largest
calibrated score spread (label-free: the ranker's own scores,
edge_pu.algo.preferences.group_spread) against random draws of as many prompts: the share whose
K candidates differ in checker quality, and the room to improve (best minus mean candidate
quality). Prints one line per seed and ranker.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics as st
from pathlib import Path

from edge_pu.algo.preferences import group_scores, group_spread


def _scores(path: Path) -> dict[str, list[float]]:
    rows = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {r["prompt_id"]: r["scores"] for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dir")
    ap.add_argument("--budget", type=int, default=24, help="prompts the PU steps can use")
    args = ap.parse_args()
    seeds = [d for d in sorted(Path(args.eval_dir).glob("seed-*"))
             if (d / "shared-sft" / "scores-oracle.jsonl").exists()]
    if not seeds:
        raise SystemExit(f"{args.eval_dir}: no seed-S/shared-sft/scores-oracle.jsonl; run "
                         "`edge-pu eval` with a two-stage method and `--rankers ... oracle`.")
    for seed_dir in seeds:
        sh = seed_dir / "shared-sft"
        cands: dict[str, list[dict]] = {}
        for line in (sh / "candidates.jsonl").read_text().splitlines():
            r = json.loads(line)
            cands.setdefault(r["prompt_id"], []).append(r)
        quality = _scores(sh / "scores-oracle.jsonl")
        for f in sorted(sh.glob("scores-*.jsonl")):
            spec = f.stem.removeprefix("scores-")
            if spec == "oracle":
                continue
            s = _scores(f)
            fin = {p: [bool(c.get("finished", True)) for c in cands[p]] for p in s}
            cal = group_scores(s, fin, calibration="pooled", unfinished="below")
            spread = {p: group_spread(cal[p]) for p in s}
            differ = {p: max(quality[p]) - min(quality[p]) > 1e-9 for p in s}
            room = {p: max(quality[p]) - st.fmean(quality[p]) for p in s}
            pids, n = list(s), min(args.budget, len(s))
            top = sorted(pids, key=lambda p: -spread[p])[:n]
            draws = [random.Random(i).sample(pids, n) for i in range(200)]
            rand_differ = st.fmean(sum(differ[p] for p in d) / n for d in draws)
            rand_room = st.fmean(st.fmean(room[p] for p in d) for d in draws)
            print(f"{seed_dir.name} {spec:10s} {len(pids)} prompts, {n} chosen | by spread: "
                  f"{sum(differ[p] for p in top) / n:.0%} differ, room "
                  f"{st.fmean(room[p] for p in top):.3f} | at random: {rand_differ:.0%} differ, "
                  f"room {rand_room:.3f} | all: {sum(differ.values()) / len(pids):.0%} differ")


if __name__ == "__main__":
    main()
