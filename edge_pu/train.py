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
from .algo.preferences import (
    group_scores,
    group_spread,
    is_tied,
    listwise_target,
    make_pairs,
    pooled_reward_std,
)
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


def loss_config(cfg: TrainConfig, units: Sequence[Unit] = ()) -> LossConfig:
    """The loss hyperparameters of a round; `units` supply the pooled advantage scale."""
    norm = cfg.length_norm
    dist = cfg.algorithm == "grpo" and cfg.grpo_variant == "distribution"
    if dist and norm == "token":
        norm = "none"  # the distribution variant's alternative to mean-token is the summed ratio
    adv_std = 0.0
    if cfg.algorithm == "grpo" and cfg.advantage_norm == "pooled" and units:
        adv_std = pooled_reward_std([u.target or [] for u in units])
    return LossConfig(beta=cfg.dist_beta if dist else cfg.beta, clip_eps=cfg.clip_eps,
                      beta_kl=cfg.beta_kl, kl_cap=cfg.kl_cap, length_norm=norm,
                      adv_std=adv_std)


ANCHOR = -1  # the index pairs.jsonl gives the anchor when it joins a pair or a group


def build_units(cfg: TrainConfig, prompt_ids: dict[str, list[int]],
                candidates: dict[str, list[list[int]]], scores: dict[str, list[float]],
                finished: dict[str, list[bool]] | None = None,
                anchors: dict[str, list[int]] | None = None
                ) -> tuple[list[Unit], list[dict], dict[str, int]]:
    """Returns (units, records for pairs.jsonl, counts).

    Scores are calibrated per `cfg.calibration` and unfinished candidates handled per
    `cfg.unfinished` (edge_pu.algo.preferences.group_scores). With `cfg.anchor: positive` and
    `anchors` (prompt id -> anchor completion tokens), the anchor is the labelled positive:
    it scores `anchor_margin` above the group's best candidate, so DPO adds the pair
    (anchor, worst candidate) and GRPO's group becomes K + 1 rows with the anchor's share of
    the target mass. counts: tied (prompts with no signal), unfinished (candidates),
    dropped (candidates left out), anchor_units.
    """
    finished = finished or {pid: [True] * len(s) for pid, s in scores.items()}
    cal = group_scores(scores, finished, calibration=cfg.calibration, unfinished=cfg.unfinished)
    use_anchor = cfg.anchor == "positive" and anchors is not None
    units: list[Unit] = []
    records: list[dict] = []
    counts = {"tied": 0, "unfinished": sum(not f for fs in finished.values() for f in fs),
              "dropped": sum(v is None for vs in cal.values() for v in vs), "anchor_units": 0,
              "unselected": 0}
    chosen = select_prompts(cfg, cal, anchored=use_anchor)
    counts["unselected"] = len(cal) - len(chosen)
    for pid, raw in cal.items():
        if pid not in chosen:
            continue
        keep = [j for j, v in enumerate(raw) if v is not None]
        s = [float(raw[j]) for j in keep]  # type: ignore[arg-type]
        comps = [candidates[pid][j] for j in keep]
        tied = is_tied(s)
        with_anchor = bool(use_anchor and anchors is not None and pid in anchors and s)
        if with_anchor:
            s = s + [max(s) + cfg.anchor_margin]
            comps = comps + [anchors[pid]]
            keep = keep + [ANCHOR]
        if tied:
            counts["tied"] += 1
            if not with_anchor or len(s) < 2:
                continue
        if cfg.algorithm == "dpo":
            own = s[:-1] if with_anchor else s
            pairs = [] if tied else make_pairs(own, margin=cfg.margin, strategy=cfg.pair_strategy)
            if with_anchor and len(s) >= 2:
                worst = min(range(len(s) - 1), key=s.__getitem__)
                pairs.append((len(s) - 1, worst))
            for w, lose in pairs:
                units.append(Unit(pid, prompt_ids[pid], [comps[w], comps[lose]]))
                records.append({"prompt_id": pid, "chosen": keep[w], "rejected": keep[lose],
                                "gap": s[w] - s[lose]})
                counts["anchor_units"] += keep[w] == ANCHOR
        else:
            d = listwise_target(s, tau=cfg.tau)
            units.append(Unit(pid, prompt_ids[pid], comps, target=d))
            records.append({"prompt_id": pid, "rows": keep, "target": d})
            counts["anchor_units"] += with_anchor
    return units, records, counts


def select_prompts(cfg: TrainConfig, cal: dict[str, list[float | None]], *,
                   anchored: bool) -> set[str]:
    """The prompts a round trains on (`train.select`).

    `all` keeps every prompt. `spread` keeps the prompts whose candidates the ranker tells
    apart (`group_spread` > 0: a prompt the student answers the same way K times has nothing
    to rank, and its anchor-only unit would push the K copies down even when they are right),
    and with a fixed step budget (train.steps > 0) whose units (steps x batch_size) are fewer
    than those prompts' units, the ones with the largest spread (ties: input order). Under
    pooled calibration the spread is on one scale for every prompt. A prompt gives one GRPO
    group, or for DPO best-worst one pair plus the anchor's.
    """
    if cfg.select == "all":
        return set(cal)
    spread = {pid: group_spread(v) for pid, v in cal.items()}
    order = sorted((pid for pid in cal if spread[pid] > 1e-12), key=lambda pid: -spread[pid])
    if cfg.steps <= 0:
        return set(order)
    per_prompt = 1 if cfg.algorithm == "grpo" else (
        (2 if anchored else 1) if cfg.pair_strategy == "best-worst" else 1)
    budget = math.ceil(cfg.steps * cfg.batch_size / per_prompt)
    return set(order[:budget])  # sorted() is stable: ties keep input order


def pu_subset(anchored: set[str], n: int, seed: int, round_idx: int) -> set[str]:
    """The prompts round `round_idx` samples (`train.sample_prompts`): all when n <= 0 or n
    covers them, else the n with the smallest sha256 of "seed|round|id": fixed by the seed,
    different each round, independent of the prompts' order (crc32 would not do: one changed
    character XORs every checksum by the same constant, which keeps much of the order)."""
    if n <= 0 or n >= len(anchored):
        return set(anchored)
    import hashlib

    return set(sorted(anchored, key=lambda pid: hashlib.sha256(
        f"{seed}|{round_idx}|{pid}".encode()).hexdigest())[:n])


def attach_logprobs(backend: Backend, units: Sequence[Unit], need_old: bool,
                    batch: int = 8) -> None:
    """Fill each unit's reference (and, for GRPO, sampling-policy) token log-probs.

    While the policy still equals the reference (a fresh adapter, or the SFT adapter the PU
    stage starts from), its log-probs are copied, not recomputed.
    """
    rows = [(u, j) for u in units for j in range(len(u.completions))]
    identity = need_old and getattr(backend, "policy_is_reference", lambda: False)()
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
    lcfg = loss_config(cfg, units)
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
        # A micro-batch's GRPO groups are one [G, K] tensor, so they must be the same size: a
        # group whose anchor was checked out (train.anchor_check) has K rows, not K + 1.
        micro = [same[s: s + cfg.micro_batch]
                 for size in sorted({len(u.completions) for u in pick})
                 for same in [[u for u in pick if len(u.completions) == size]]
                 for s in range(0, len(same), cfg.micro_batch)]
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
