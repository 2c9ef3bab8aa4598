"""The evaluation's training baselines that are not PU self-ranking: SFT and SPIN-style DPO.

- `sft`: supervised fine-tuning on the anchors: the pipeline's own SFT stage (edge_pu.sft),
  run alone for the whole budget.
- `spin`: DPO with the anchor as chosen and one of the student's own samples as rejected
  (candidate 0 of the shared round-1 candidates): the "teacher = chosen, student = rejected"
  scheme METHOD.md contrasts with PU ranking. It runs edge_pu's own DPO loop (edge_pu.train).

Both write one metrics line per optimizer step to `run_dir/metrics.jsonl`, as the pipeline does,
so the training curves of every method come from the same file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..jsonl import append_jsonl
from ..sft import anchor_completion, sft_loss, train_sft
from ..train import Unit, attach_logprobs, train

__all__ = ["anchor_completion", "sft_loss", "spin_units", "train_sft", "train_spin"]


def spin_units(prompt_ids: dict[str, list[int]], anchors: dict[str, list[int]],
               rejected: dict[str, list[int]]) -> list[Unit]:
    """One DPO unit per prompt: chosen = the anchor, rejected = a student sample."""
    return [Unit(pid, prompt_ids[pid], [anchors[pid], rejected[pid]])
            for pid in sorted(anchors) if pid in rejected]


def train_spin(backend: Any, units: list[Unit], cfg: TrainConfig, *, run_dir: Path,
               ref_batch: int = 8) -> int:
    attach_logprobs(backend, units, need_old=False, batch=ref_batch)

    def log(m: dict) -> None:
        append_jsonl(run_dir / "metrics.jsonl", [m])

    return train(backend, units, cfg, round_idx=1, on_step=log)
