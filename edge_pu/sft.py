"""Stage 1 of `edge-pu run`: supervised fine-tuning of the LoRA on the anchors (METHOD.md).

Input: the backend (a fresh adapter), the run config (`sft:` section), each anchored prompt's
chat token ids and anchor text. Output: the SFT adapter, saved as `run_dir/state/sft/adapter`
(the stage's resume point, written beside and renamed, `COMPLETE` last), one metrics line per
optimizer step (`{"stage": "sft", ...}` in metrics.jsonl), and the backend left with
the SFT policy as its reference (`backend.set_reference()`): the PU stage then measures its
log-ratios against it, judges with it and samples round 1 from it. A rerun finds the state and
loads it instead of training again; a run killed mid-stage redoes the stage from its start.

The loss is the token-mean NLL of the anchor tokens (`sft_loss`), injected into
`backend.train_step` like every other loss.
"""

from __future__ import annotations

import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from . import distributed as dist
from .algo.losses import LossConfig, LossInputs, LossOutput
from .backends.base import TrainBatch
from .config import RunConfig, TrainConfig
from .jsonl import append_jsonl, read_jsonl, write_atomic, write_jsonl_atomic


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


def sft_steps(cfg: RunConfig, n_anchors: int) -> int:
    s = cfg.sft
    return s.steps if s.steps > 0 else max(1, math.ceil(s.epochs * n_anchors / s.batch_size))


def sft_train_config(cfg: RunConfig, n_anchors: int) -> TrainConfig:
    """The optimizer settings of the SFT stage (its own lr, warmup and batch)."""
    s = cfg.sft
    return replace(cfg.train, lr=s.lr, warmup_steps=s.warmup_steps, batch_size=s.batch_size,
                   micro_batch=s.micro_batch, steps=sft_steps(cfg, n_anchors))


def sft_batches(prompt_ids: Sequence[list[int]], completions: Sequence[list[int]],
                micro_rows: int) -> list[TrainBatch]:
    rows = list(zip(prompt_ids, completions, strict=True))
    micro = [rows[s: s + micro_rows] for s in range(0, len(rows), micro_rows)]
    return [TrainBatch([p for p, _ in m], [c for _, c in m], [[0.0] * len(c) for _, c in m],
                       weight=len(m) / len(rows)) for m in micro]


def train_sft(backend: Any, prompt_ids: dict[str, list[int]], anchors: dict[str, list[int]],
              cfg: TrainConfig, *, rows_per_step: int, micro_rows: int,
              on_step: Callable[[dict], None] | None = None, start_step: int = 0,
              stop_step: int = 0) -> int:
    """Optimizer steps start_step..stop_step (default cfg.steps) over (prompt, anchor) rows,
    shuffled per epoch by cfg.seed. The draw order depends only on (seed, step), so training
    to step 8 and then on to 16 takes the same steps as training to 16 at once."""
    ids = sorted(anchors)
    rng = random.Random(cfg.seed * 1000 + 1)
    steps = stop_step or max(1, cfg.steps)
    order: list[str] = []
    while len(order) < steps * rows_per_step:
        perm = list(ids)
        rng.shuffle(perm)
        order += perm
    for step in range(start_step, steps):
        pick = order[step * rows_per_step: (step + 1) * rows_per_step]
        batches = sft_batches([prompt_ids[p] for p in pick], [anchors[p] for p in pick],
                              micro_rows)
        metrics = backend.train_step(batches, sft_loss, LossConfig())
        metrics.update(stage="sft", round=0, step=step + 1, steps=max(1, cfg.steps))
        if on_step:
            on_step(metrics)
    return steps


def run_sft(backend: Any, cfg: RunConfig, prompt_ids: dict[str, list[int]],
            anchors: dict[str, str], run_dir: Path,
            info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (or resume) the SFT stage; returns its diagnostics. See the module docstring.
    `info` (a meter stage's record) gets `resumed: true` when the finished state was on disk.

    In a torchrun job every rank trains (each step's micro-batches split over the ranks by the
    backend) and rank 0 alone writes the metrics and the state."""
    state = run_dir / "state" / "sft"
    main = dist.world().main
    mpath = run_dir / "metrics.jsonl"
    done = (state / "COMPLETE").exists()
    if info is not None:
        info["resumed"] = done
    if done:
        backend.load_adapter(state / "adapter")
        backend.set_reference()
        backend.reset_optimizer(cfg.train)
        done = [m for m in read_jsonl(mpath) if m.get("event") == "sft_end"]
        print(f"[sft] already trained; resumed from {state}", flush=True)
        return {k: v for k, v in (done[-1] if done else {}).items() if k != "event"}
    kept = [m for m in read_jsonl(mpath) if m.get("stage") != "sft"
            and m.get("event") != "sft_end"]
    if main and mpath.exists() and len(kept) != len(read_jsonl(mpath)):
        write_jsonl_atomic(mpath, kept)  # an interrupted attempt's steps are logged once
    completions = {pid: anchor_completion(backend, a) for pid, a in anchors.items()}
    tcfg = sft_train_config(cfg, len(completions))
    backend.reset_optimizer(tcfg)
    print(f"[sft] {tcfg.steps} steps of {tcfg.batch_size} anchors ({len(completions)} "
          f"anchored prompts, lr {tcfg.lr:g})", flush=True)
    losses: list[float] = []
    bar = tqdm(total=tcfg.steps, desc="sft", unit="step")

    def on_step(m: dict) -> None:
        if main:
            append_jsonl(mpath, [m])
        losses.append(m["loss"])
        bar.set_postfix(loss=f"{m['loss']:.4f}")
        bar.update(1)

    early: dict[str, Any] = {}
    if cfg.sft.early_stop:
        early = _train_early_stopped(backend, cfg, prompt_ids, completions, tcfg, on_step,
                                     state.with_name("sft.best"))
    else:
        train_sft(backend, prompt_ids, completions, tcfg, rows_per_step=tcfg.batch_size,
                  micro_rows=tcfg.micro_batch, on_step=on_step)
    bar.close()
    if main:
        tmp = state.with_name("sft.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        backend.save_adapter(tmp / "adapter")
        write_atomic(tmp / "COMPLETE", "ok\n")
        shutil.rmtree(state, ignore_errors=True)
        tmp.rename(state)
    backend.set_reference()
    backend.reset_optimizer(cfg.train)
    diag = {"stage": "sft", "steps": early.get("best_step", tcfg.steps),
            "anchors": len(completions), "loss_first": losses[0], "loss_last": losses[-1],
            **({"early_stop": early} if early else {})}
    if main:
        append_jsonl(mpath, [{"event": "sft_end", **diag}])
    print(f"[sft] done: loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    return diag


def held_back(ids: Sequence[str], fraction: float) -> set[str]:
    """The anchors early stopping holds back: round(fraction x n) ids (at least 1, never all)
    with the smallest sha256 of the id, so the split is the id's, not the file order's."""
    import hashlib

    n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
    return set(sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())[:n])


def anchor_nll(backend: Any, prompt_ids: dict[str, list[int]], completions: dict[str, list[int]],
               ids: Sequence[str], batch: int = 4) -> float:
    """Mean token NLL of the anchors `ids` under the current policy."""
    total, count = 0.0, 0
    ids = sorted(ids)
    for s in range(0, len(ids), batch):
        chunk = ids[s: s + batch]
        for lp in backend.logprobs([prompt_ids[i] for i in chunk],
                                   [completions[i] for i in chunk], adapter=True):
            total -= sum(lp)
            count += len(lp)
    return total / max(1, count)


def _train_early_stopped(backend: Any, cfg: RunConfig, prompt_ids: dict[str, list[int]],
                         completions: dict[str, list[int]], tcfg: TrainConfig,
                         on_step: Callable[[dict], None], best_dir: Path) -> dict[str, Any]:
    """SFT up to tcfg.steps on the anchors not held back, evaluated every sft.eval_every steps
    on those held back; stops after sft.patience evaluations without a new best and leaves the
    backend with the best adapter (step 0 counts: if training only hurts, the start wins)."""
    s = cfg.sft
    if dist.world().size > 1:
        from .errors import EdgePuError

        raise EdgePuError("sft.early_stop runs in one process for now; in a torchrun job set "
                          "sft.early_stop: false (or sft.steps to the step it chose).")
    val = held_back(sorted(completions), s.val_fraction)
    train = {p: c for p, c in completions.items() if p not in val}
    curve = {0: anchor_nll(backend, prompt_ids, completions, list(val), s.micro_batch)}
    best, done, since = 0, 0, 0
    shutil.rmtree(best_dir, ignore_errors=True)
    backend.save_adapter(best_dir / "adapter")
    while done < tcfg.steps and since < s.patience:
        stop = min(tcfg.steps, done + s.eval_every)
        train_sft(backend, prompt_ids, train, tcfg, rows_per_step=tcfg.batch_size,
                  micro_rows=tcfg.micro_batch, on_step=on_step, start_step=done,
                  stop_step=stop)
        done = stop
        curve[done] = anchor_nll(backend, prompt_ids, completions, list(val), s.micro_batch)
        print(f"[sft] step {done}: held-back anchor NLL {curve[done]:.4f}", flush=True)
        if curve[done] < curve[best] - 1e-6:
            best, since = done, 0
            shutil.rmtree(best_dir, ignore_errors=True)
            backend.save_adapter(best_dir / "adapter")
        else:
            since += 1
    if best != done:
        backend.load_adapter(best_dir / "adapter")
    shutil.rmtree(best_dir, ignore_errors=True)
    print(f"[sft] early stopping: best at step {best} of {done} (held-back NLL "
          f"{curve[best]:.4f}, {len(val)} anchors held back)", flush=True)
    return {"val_prompts": len(val), "val_nll_by_step": {str(k): v for k, v in curve.items()},
            "best_step": best, "stopped_at": done}
