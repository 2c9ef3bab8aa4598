"""The evaluation's training baselines that are not PU self-ranking: SFT and SPIN-style DPO.

- `sft`: supervised fine-tuning on the anchors. `sft_loss` is the token-mean negative
  log-likelihood of the anchor tokens, injected into `backend.train_step` like any loss
  (rows = (prompt, anchor + EOS); no reference model, no pairs).
- `spin`: DPO with the anchor as chosen and one of the student's own samples as rejected
  (candidate 0 of the shared round-1 candidates): the "teacher = chosen, student = rejected"
  scheme METHOD.md contrasts with PU ranking. It runs edge_pu's own DPO loop (edge_pu.train).

Both write one metrics line per optimizer step to `run_dir/metrics.jsonl`, as the pipeline does,
so the training curves of every method come from the same file.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..algo.losses import LossConfig, LossInputs, LossOutput
from ..backends.base import TrainBatch
from ..config import TrainConfig
from ..jsonl import append_jsonl
from ..train import Unit, attach_logprobs, train


def sft_loss(x: LossInputs, cfg: LossConfig) -> LossOutput:
    """L = -(1 / sum mask) * sum_{i,t} mask_it * logp_it: mean NLL over every anchor token.

    Token-mean (not sequence-mean), as supervised fine-tuning usually is: a long anchor weighs
    more. `ref_token_logp` and the pair/group structure are ignored.
    """
    import torch

    logp, mask = x.token_logp.float(), x.mask.float()
    nll = -torch.where(mask > 0, logp, torch.zeros_like(logp)).sum() / mask.sum().clamp_min(1.0)
    return LossOutput(loss=nll, metrics={"loss": float(nll.detach())})


def anchor_completion(backend: Any, anchor: str) -> list[int]:
    """The anchor's tokens as an assistant completion, ended by the student's EOS token."""
    eos = getattr(backend, "eos_ids", None) or []
    return backend.token_ids(anchor) + list(eos[:1])


def sft_batches(prompt_ids: Sequence[list[int]], completions: Sequence[list[int]],
                micro_rows: int) -> list[TrainBatch]:
    rows = list(zip(prompt_ids, completions, strict=True))
    micro = [rows[s: s + micro_rows] for s in range(0, len(rows), micro_rows)]
    return [TrainBatch([p for p, _ in m], [c for _, c in m], [[0.0] * len(c) for _, c in m],
                       weight=len(m) / len(rows)) for m in micro]


def train_sft(backend: Any, prompt_ids: dict[str, list[int]], anchors: dict[str, list[int]],
              cfg: TrainConfig, *, rows_per_step: int, micro_rows: int, run_dir: Path,
              on_step: Callable[[dict], None] | None = None) -> int:
    """`cfg.steps` optimizer steps over (prompt, anchor) rows, shuffled per epoch by cfg.seed."""
    ids = sorted(anchors)
    rng = random.Random(cfg.seed * 1000 + 1)
    order: list[str] = []
    steps = max(1, cfg.steps)
    while len(order) < steps * rows_per_step:
        perm = list(ids)
        rng.shuffle(perm)
        order += perm
    for step in range(steps):
        pick = order[step * rows_per_step: (step + 1) * rows_per_step]
        batches = sft_batches([prompt_ids[p] for p in pick], [anchors[p] for p in pick],
                              micro_rows)
        metrics = backend.train_step(batches, sft_loss, LossConfig())
        metrics.update(round=1, step=step + 1, steps=steps)
        append_jsonl(run_dir / "metrics.jsonl", [metrics])
        if on_step:
            on_step(metrics)
    return steps


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
