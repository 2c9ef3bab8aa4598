"""One SFT trajectory per seed, checkpointed, shared by every method that starts with SFT.

`sft_path(...)` trains the freshly reset adapter on the anchors for max(checkpoints) steps and
saves the adapter at each checkpoint step as `DIR/step-S/adapter` (+ `COMPLETE`), the layout of
a run dir's `state/sft/`, so a two-stage method's run dir takes a checkpoint as its finished
SFT stage. The draw order and the constant-after-warmup learning rate depend only on (seed,
step), so the checkpoint at S steps is exactly what SFT run for S steps gives: `sft` (N steps),
`sft-best` (N/2 .. 2N) and the SFT stage of `sft+pu-*` (N - N_pu) are points of one path.
A rerun reuses every checkpoint already saved; if one is missing the path is retrained.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..jsonl import append_jsonl, write_atomic
from ..sft import anchor_completion, sft_train_config, train_sft


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def sft_path(backend: Any, cfg: RunConfig, prompt_ids: dict[str, list[int]],
             anchors: dict[str, str], root: Path, checkpoints: list[int]) -> None:
    wanted = sorted(set(checkpoints))
    if all((checkpoint_dir(root, s) / "COMPLETE").exists() for s in wanted):
        return
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    completions = {pid: anchor_completion(backend, a) for pid, a in anchors.items()}
    tcfg = replace(sft_train_config(cfg, len(completions)), steps=wanted[-1])
    backend.reset_optimizer(tcfg)
    done = 0
    for stop in wanted:
        train_sft(backend, prompt_ids, completions, tcfg, rows_per_step=tcfg.batch_size,
                  micro_rows=tcfg.micro_batch, start_step=done, stop_step=stop,
                  on_step=lambda m: append_jsonl(root / "metrics.jsonl", [m]))
        done = stop
        out = checkpoint_dir(root, stop)
        backend.save_adapter(out / "adapter")
        write_atomic(out / "COMPLETE", "ok\n")
        print(f"[eval] SFT checkpoint at {stop} steps: {out}", flush=True)


def load_checkpoint(backend: Any, root: Path, step: int) -> None:
    """Make the checkpoint the current adapter (the reference stays what it was)."""
    backend.load_adapter(checkpoint_dir(root, step) / "adapter")


def install_as_sft_stage(root: Path, step: int, run_dir: Path) -> None:
    """Copy a checkpoint into run_dir/state/sft/, where the pipeline finds a finished SFT stage."""
    dest = run_dir / "state" / "sft"
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(checkpoint_dir(root, step), dest)
    append_jsonl(run_dir / "metrics.jsonl", [{"event": "sft_end", "stage": "sft",
                                              "steps": step, "from": str(root)}])
