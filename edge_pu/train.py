"""Training units from scores, and the optimizer loop with an injected loss.

A unit is what one optimizer step draws: a DPO pair (chosen, rejected) or a GRPO group (the
K candidates of one prompt with their label distribution d = softmax(s / tau)). The loss is a
function picked by name from `edge_pu.algo.losses.LOSSES`; the backend computes log-probs and
applies it. Reference log-probs (adapter disabled) are computed once per unit, before the first
step: the reference never changes, so recomputing them every step would waste a forward pass.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .algo.losses import LOSSES, LossConfig
from .algo.preferences import is_tied, listwise_target, make_pairs
from .backends.base import Backend, TrainBatch
from .config import TrainConfig


@dataclass
class Unit:
    prompt_id: str
    prompt_ids: list[int]
    completions: list[list[int]]  # DPO: [chosen, rejected]; GRPO: the K candidates
    target: list[float] | None = None  # GRPO label distribution
    ref: list[list[float]] | None = None
    old: list[list[float]] | None = None


def loss_name(cfg: TrainConfig) -> str:
    return "dpo" if cfg.algorithm == "dpo" else f"grpo-{cfg.grpo_variant}"


def loss_config(cfg: TrainConfig) -> LossConfig:
    norm = cfg.length_norm
    if cfg.algorithm == "grpo" and cfg.grpo_variant == "distribution" and norm == "token":
        norm = "none"  # the distribution variant's alternative to mean-token is the summed ratio
    return LossConfig(beta=cfg.beta, clip_eps=cfg.clip_eps, beta_kl=cfg.beta_kl,
                      length_norm=norm)


def build_units(cfg: TrainConfig, prompt_ids: dict[str, list[int]],
                candidates: dict[str, list[list[int]]], scores: dict[str, list[float]]
                ) -> tuple[list[Unit], list[dict], int]:
    """Returns (units, pair records for pairs.jsonl, prompts skipped because all scores tie)."""
    units: list[Unit] = []
    records: list[dict] = []
    tied = 0
    for pid, s in scores.items():
        cands = candidates[pid]
        if is_tied(s):
            tied += 1
            continue
        if cfg.algorithm == "dpo":
            for w, lose in make_pairs(s, margin=cfg.margin, strategy=cfg.pair_strategy):
                units.append(Unit(pid, prompt_ids[pid], [cands[w], cands[lose]]))
                records.append({"prompt_id": pid, "chosen": w, "rejected": lose,
                                "gap": s[w] - s[lose]})
        else:
            d = listwise_target(s, tau=cfg.tau)
            units.append(Unit(pid, prompt_ids[pid], list(cands), target=d))
            records.append({"prompt_id": pid, "target": d})
    return units, records, tied


def attach_logprobs(backend: Backend, units: Sequence[Unit], need_old: bool,
                    batch: int = 8) -> None:
    """Fill each unit's reference (and, for GRPO, sampling-policy) token log-probs.

    While the adapter is still the identity (PEFT's zero-initialised B: the first round of a
    fresh run), the policy is the reference, so its log-probs are copied, not recomputed.
    """
    rows = [(u, j) for u in units for j in range(len(u.completions))]
    identity = need_old and getattr(backend, "adapter_is_identity", lambda: False)()
    fields = (("ref", False), ("old", True)) if need_old and not identity else (("ref", False),)
    for field, adapter in fields:
        for u in units:
            setattr(u, field, [[] for _ in u.completions])
        for s in range(0, len(rows), batch):
            chunk = rows[s: s + batch]
            lps = backend.logprobs([u.prompt_ids for u, _ in chunk],
                                   [u.completions[j] for u, j in chunk], adapter=adapter)
            for (u, j), lp in zip(chunk, lps, strict=True):
                getattr(u, field)[j] = lp
    if identity:
        for u in units:
            u.old = [list(lp) for lp in u.ref or []]


def to_batch(units: Sequence[Unit], weight: float, grpo: bool) -> TrainBatch:
    b = TrainBatch([], [], [], [] if grpo else None, weight=weight)
    for u in units:
        first = len(b.completion_ids)
        idx = list(range(first, first + len(u.completions)))
        for j, comp in enumerate(u.completions):
            b.prompt_ids.append(u.prompt_ids)
            b.completion_ids.append(comp)
            b.ref_token_logp.append(u.ref[j] if u.ref else [])
            if grpo and b.old_token_logp is not None:
                b.old_token_logp.append(u.old[j] if u.old else [])
        if grpo:
            b.groups.append(idx)
            b.target.append(list(u.target or []))
        else:
            b.pairs.append((idx[0], idx[1]))
    return b


def plan_steps(cfg: TrainConfig, n_units: int) -> int:
    return cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * n_units
                                                            / cfg.batch_size))


def train(backend: Backend, units: list[Unit], cfg: TrainConfig, *, round_idx: int,
          start_step: int = 0, on_step: Callable[[dict], None] | None = None) -> int:
    """Run the optimizer steps of one round; returns the number of steps taken."""
    grpo = cfg.algorithm == "grpo"
    loss_fn = LOSSES[loss_name(cfg)]
    lcfg = loss_config(cfg)
    steps = plan_steps(cfg, len(units))
    order: list[int] = []
    rng = random.Random(cfg.seed * 1000 + round_idx)
    # The draw order is a pure function of (seed, round), so a resumed run replays it exactly.
    while len(order) < steps * cfg.batch_size:
        perm = list(range(len(units)))
        rng.shuffle(perm)
        order += perm
    for step in range(start_step, steps):
        t0 = time.time()
        pick = [units[i] for i in order[step * cfg.batch_size: (step + 1) * cfg.batch_size]]
        micro = [pick[s: s + cfg.micro_batch] for s in range(0, len(pick), cfg.micro_batch)]
        batches = [to_batch(m, len(m) / len(pick), grpo) for m in micro]
        metrics = backend.train_step(batches, loss_fn, lcfg)
        metrics.update(round=round_idx, step=step + 1, steps=steps,
                       seconds=round(time.time() - t0, 3))
        if on_step:
            on_step(metrics)
    return steps


def pair_accuracy(backend: Backend, units: Sequence[Unit], beta: float) -> dict[str, float]:
    """How often the chosen answer wins, under the reference and under the trained policy.

    implicit-reward accuracy: beta*(log pi - log ref) of chosen > that of rejected (the
    reference's rewards are all 0, so its accuracy is 0 by this strict definition);
    preference accuracy: mean-token log-prob of chosen > rejected, per policy.
    """
    if not units:
        return {}
    prompts = [u.prompt_ids for u in units for _ in (0, 1)]
    comps = [c for u in units for c in u.completions]
    pol = [sum(x) for x in backend.logprobs(prompts, comps, adapter=True)]
    ref = [sum(x) for x in (u.ref[j] for u in units for j in (0, 1))] if all(
        u.ref for u in units) else [sum(x) for x in backend.logprobs(prompts, comps,
                                                                     adapter=False)]
    lens = [max(1, len(c)) for c in comps]
    n = len(units)
    reward = [beta * (p - r) for p, r in zip(pol, ref, strict=True)]
    return {
        "pairs": n,
        "reward_accuracy_reference": 0.0,
        "reward_accuracy": sum(reward[2 * i] > reward[2 * i + 1] for i in range(n)) / n,
        "preference_accuracy_reference": sum(
            ref[2 * i] / lens[2 * i] > ref[2 * i + 1] / lens[2 * i + 1] for i in range(n)) / n,
        "preference_accuracy": sum(
            pol[2 * i] / lens[2 * i] > pol[2 * i + 1] / lens[2 * i + 1] for i in range(n)) / n,
    }
