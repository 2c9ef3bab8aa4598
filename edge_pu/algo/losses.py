"""The training losses shared by every backend: DPO and the two LDL-GRPO variants (METHOD.md).

A backend computes per-token log-probabilities of the sampled completions under the policy
(adapter on, with grad) and the reference (adapter off, no grad), packs them with the pair or
group structure into `LossInputs`, and calls `LOSSES[name](inputs, config)`. It gets back a
`LossOutput`: a scalar loss to backpropagate and plain-float metrics to log. Losses are plain
functions picked from the dict, never branches inside a trainer.

All maths runs in float32 whatever the backend's dtype: the log-ratios are small differences
of large numbers, which bf16 would round away. Padding positions (mask 0) are replaced by 0
before any arithmetic, so -inf or NaN there cannot leak into the loss or its gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

LENGTH_NORMS = ("sequence", "token", "none")


@dataclass
class LossInputs:
    """Per-token log-probs of N completion rows plus the pair (DPO) or group (GRPO) structure."""

    token_logp: Tensor  # [N, T] policy log-prob of each completion token (requires grad)
    ref_token_logp: Tensor  # [N, T] reference policy (adapter disabled), no grad
    mask: Tensor  # [N, T] float, 1.0 on completion tokens, 0.0 on padding
    old_token_logp: Tensor | None = None  # [N, T] sampling policy; None -> token_logp.detach()
    pairs: Tensor | None = None  # LongTensor [P, 2]: (chosen row, rejected row) (DPO)
    groups: Tensor | None = None  # LongTensor [G, K]: rows of each prompt's K candidates (GRPO)
    target: Tensor | None = None  # FloatTensor [G, K]: label distribution d per group (GRPO)


@dataclass(frozen=True)
class LossConfig:
    """Loss hyperparameters; each loss reads only the fields it needs.

    length_norm:
      grpo-advantage: "sequence" averages each row's token losses, then the rows (GRPO);
        "token" sums all token losses and divides by the total token count (DAPO), so long
        completions weigh more.
      grpo-distribution: "sequence" scores a row by its mean-token log-ratio l_i (METHOD.md);
        "none" by its summed log-ratio (the DPO implicit reward, which favours length).
      dpo always uses summed sequence log-probs and ignores it.
    """

    beta: float = 0.1  # DPO beta; distribution-variant beta (sharpness of q)
    clip_eps: float = 0.2  # GRPO ratio clip
    beta_kl: float = 0.04  # GRPO weight of the KL(pi || pi_ref) penalty
    # Where the k3 KL turns linear: past ref - logp = kl_cap it continues along its tangent, so
    # one token that fell far below the reference pulls with at most beta_kl (e^kl_cap - 1)
    # instead of beta_kl e^(ref - logp) (`k3_kl`). 0 = the plain k3.
    kl_cap: float = 4.0
    length_norm: str = "sequence"
    eps: float = 1e-6  # advantage std floor; a group with std(r) <= eps has zero advantage
    # > 0: divide every group's centred rewards by this one number (the round's pooled std of
    # r, `preferences.pooled_reward_std`) instead of by the group's own std, so a group whose
    # scores barely differ gets a small advantage rather than a full-size one.
    adv_std: float = 0.0

    def __post_init__(self) -> None:
        if self.length_norm not in LENGTH_NORMS:
            raise ValueError(
                f"LossConfig.length_norm is {self.length_norm!r}: use one of {LENGTH_NORMS}"
            )
        for name in ("beta", "clip_eps", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LossConfig.{name} is {getattr(self, name)}: it must be > 0")
        for name in ("beta_kl", "kl_cap"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"LossConfig.{name} is {getattr(self, name)}: it must be >= 0")
        if not self.adv_std >= 0:
            raise ValueError(f"LossConfig.adv_std is {self.adv_std}: it must be >= 0")


@dataclass
class LossOutput:
    loss: Tensor  # scalar
    metrics: dict[str, float] = field(default_factory=dict)  # plain floats for logging


def _masked(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask > 0, values, torch.zeros_like(values))


def sequence_logp(token_logp: Tensor, mask: Tensor) -> Tensor:
    """Sequence log-probs [N]: the sum of each row's completion-token log-probs."""
    return _masked(token_logp, mask).sum(-1)


def _mean_token(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over each row's completion tokens [N] (0 for a row with no tokens)."""
    return _masked(values, mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def _floats(**values: Tensor) -> dict[str, float]:
    # One device->host copy for all metrics instead of one .item() sync each.
    numbers = torch.stack([v.detach().float().reshape(()) for v in values.values()]).tolist()
    return dict(zip(values, numbers, strict=True))


def _rows(x: LossInputs, loss: str) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 (policy, reference, mask), checked to share one [N, T] shape."""
    shape = x.token_logp.shape
    if x.token_logp.dim() != 2:
        raise ValueError(f"{loss}: token_logp must be [N, T], got shape {tuple(shape)}")
    for name in ("ref_token_logp", "mask", "old_token_logp"):
        other = getattr(x, name)
        if other is not None and other.shape != shape:
            raise ValueError(
                f"{loss}: {name} has shape {tuple(other.shape)}, token_logp {tuple(shape)}"
            )
    return x.token_logp.float(), x.ref_token_logp.detach().float(), x.mask.float()


def _grouped(x: LossInputs, loss: str) -> tuple[Tensor, Tensor]:
    """(groups [G, K], target [G, K] float32), checked: d_g is a distribution over K rows."""
    if x.groups is None or x.target is None:
        raise ValueError(f"{loss} needs LossInputs.groups and LossInputs.target (GRPO groups)")
    groups, target = x.groups.long(), x.target.detach().float()
    if groups.dim() != 2 or groups.numel() == 0 or groups.shape != target.shape:
        raise ValueError(
            f"{loss}: groups {tuple(groups.shape)} and target {tuple(target.shape)} must be one "
            "non-empty [G, K] shape"
        )
    if groups.min() < 0 or groups.max() >= x.token_logp.shape[0]:
        raise ValueError(f"{loss}: groups index rows outside 0..{x.token_logp.shape[0] - 1}")
    sums = target.sum(-1)
    if (target < 0).any() or not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
        raise ValueError(f"{loss}: each target row must be a distribution (>= 0, sums to 1)")
    return groups, target


def dpo_loss(x: LossInputs, cfg: LossConfig) -> LossOutput:
    """L = -mean_pairs log sigmoid(beta [(pi_w - ref_w) - (pi_l - ref_l)]).

    pi_* and ref_* are summed completion-token log-probs. beta (pi - ref) is the implicit
    reward; metrics report its mean for chosen and rejected rows, their mean margin and the
    share of pairs where the chosen reward is strictly higher.
    """
    logp, ref, mask = _rows(x, "dpo")
    if x.pairs is None or x.pairs.numel() == 0:
        # A batch of all-tied prompts has no pair; the caller skips it rather than step on 0.
        raise ValueError("dpo needs at least one (chosen, rejected) row pair in LossInputs.pairs")
    pairs = x.pairs.long().reshape(-1, 2)
    reward = cfg.beta * (sequence_logp(logp, mask) - sequence_logp(ref, mask))
    chosen, rejected = reward[pairs[:, 0]], reward[pairs[:, 1]]
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).mean()
    metrics = _floats(
        loss=loss,
        reward_margin=margin.mean(),
        reward_accuracy=(margin > 0).float().mean(),
        chosen_reward=chosen.mean(),
        rejected_reward=rejected.mean(),
    )
    return LossOutput(loss=loss, metrics=metrics)


def group_advantages(target: Tensor, eps: float = 1e-6, adv_std: float = 0.0) -> Tensor:
    """A = (r - mean r) / (std r + eps) per group, with r = K d; [G, K] in, [G, K] out.

    With adv_std > 0 the divisor is that one number for every group (A = (r - mean r) /
    adv_std), and only a group with std(r) <= eps is zeroed.

    std is the population std (divide by K, not K - 1): the K candidates are the whole group
    being ranked, not a sample of one, and so each group's advantages have mean 0 and variance
    ~1 (exactly 1 as eps -> 0). A group with std(r) <= eps (uniform target: all scores tied)
    gets A = 0 exactly: float rounding in K d would otherwise be divided by eps alone and turn
    "no information" into a spurious advantage of order 0.1.
    """
    reward = target.shape[-1] * target
    std = reward.std(dim=-1, correction=0, keepdim=True)
    divisor = adv_std if adv_std > 0 else std + eps
    adv = (reward - reward.mean(dim=-1, keepdim=True)) / divisor
    return torch.where(std > eps, adv, torch.zeros_like(adv))


def _sequence_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    return _mean_token(per_token, mask).mean()


def _token_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    return _masked(per_token, mask).sum() / mask.sum().clamp_min(1.0)


_AGGREGATE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sequence": _sequence_mean,
    "token": _token_mean,
}


def k3_kl(ref_minus: Tensor, cap: float) -> Tensor:
    """Schulman's k3 estimate of KL(pi || pi_ref) per token, x = ref - logp:
      k3(x) = e^x - x - 1                                    for x <= cap (or cap = 0),
      k3(cap) + k3'(cap) (x - cap) = e^c - c - 1 + (e^c - 1)(x - c)   for x > cap = c.
    Value and slope are continuous at c; past it the gradient stays e^c - 1. Why: after a few
    steps one token of a pushed-down candidate can sit 6-7 nats under the reference, and plain
    k3 then gives it e^6.6 ~ 735 (seen at 0.5B: kl 734, grad norm 2566 in one GRPO step), so the
    clipped step is spent on that token alone. verl's low_var_kl clamps the value at 10 instead,
    which leaves such a token no pull back at all; the tangent keeps a bounded one."""
    if cap <= 0:
        return torch.exp(ref_minus) - ref_minus - 1.0
    inside = ref_minus.clamp(max=cap)
    e = torch.exp(inside)
    return e - inside - 1.0 + (e - 1.0) * (ref_minus - inside)


def grpo_advantage_loss(x: LossInputs, cfg: LossConfig) -> LossOutput:
    """LDL-GRPO, `advantage` variant: clipped surrogate with A from r = K d, plus k3 KL.

    Per completion token t of row i in a group:
      ratio = exp(logp - old_logp)
      surrogate = min(ratio A_i, clip(ratio, 1 - clip_eps, 1 + clip_eps) A_i)
      kl = exp(ref - logp) - (ref - logp) - 1  (Schulman's k3: unbiased, >= 0, and its
           gradient vanishes where logp == ref; linear past ref - logp = kl_cap: `k3_kl`)
      loss_t = -(surrogate - beta_kl kl)
    then aggregated per `cfg.length_norm` ("sequence" or "token"). Rows in no group are
    ignored; a row in two groups counts twice. With old = current (one step per batch) ratio
    is 1 and the surrogate's gradient is A_i times the gradient of logp.
    """
    logp, ref, mask = _rows(x, "grpo-advantage")
    if cfg.length_norm not in _AGGREGATE:
        raise ValueError(
            f"LossConfig.length_norm {cfg.length_norm!r} does not apply to grpo-advantage: "
            f"use one of {tuple(_AGGREGATE)}"
        )
    groups, target = _grouped(x, "grpo-advantage")
    old = x.token_logp if x.old_token_logp is None else x.old_token_logp
    rows = groups.reshape(-1)
    logp, ref, mask = logp[rows], ref[rows], mask[rows]
    old = old.detach().float()[rows]
    adv = group_advantages(target, cfg.eps, cfg.adv_std)
    adv_tok = adv.reshape(-1, 1)

    ratio = torch.exp(_masked(logp - old, mask))
    low, high = 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps
    surrogate = torch.minimum(ratio * adv_tok, ratio.clamp(low, high) * adv_tok)
    ref_minus = _masked(ref - logp, mask)
    kl = k3_kl(ref_minus, cfg.kl_cap)
    per_token = -(surrogate - cfg.beta_kl * kl)
    loss = _AGGREGATE[cfg.length_norm](per_token, mask)
    capped = (ref_minus > cfg.kl_cap) if cfg.kl_cap > 0 else torch.zeros_like(mask)

    # A token is clipped when min() picked the clipped term and so passes no gradient.
    clipped = ((ratio < low) & (adv_tok < 0)) | ((ratio > high) & (adv_tok > 0))
    metrics = _floats(
        loss=loss,
        kl=_token_mean(kl, mask),
        clip_fraction=_token_mean(clipped.float(), mask),
        kl_capped_fraction=_token_mean(capped.float(), mask),
        adv_abs_mean=adv.abs().mean(),
        zero_variance_groups=(adv.abs().sum(-1) == 0).sum(),
    )
    return LossOutput(loss=loss, metrics=metrics)


def listwise_kl(log_ratio: Tensor, target: Tensor, *, beta: float) -> tuple[Tensor, Tensor]:
    """KL(d || q) averaged over groups, with q = softmax(beta l) per group; returns (loss, q).

    log_ratio (l) and target (d) are [G, K]. loss = (1/G) sum_g sum_i d_gi log(d_gi / q_gi),
    with d log d = 0 at d = 0. Since sum_i d_gi = 1, d loss / d l_gi = beta (q_gi - d_gi) / G:
    the policy's log-ratio rises on candidates the target favours more than q does, and the
    gradient vanishes once q matches d.
    """
    log_q = F.log_softmax(beta * log_ratio, dim=-1)
    per_group = (torch.special.xlogy(target, target) - target * log_q).sum(-1)
    return per_group.mean(), log_q.exp()


_SEQUENCE_SCORE: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "sequence": _mean_token,
    "none": lambda values, mask: _masked(values, mask).sum(-1),
}


def grpo_distribution_loss(x: LossInputs, cfg: LossConfig) -> LossOutput:
    """LDL-GRPO, `distribution` variant: KL(d || softmax(beta l)) within each group.

    l_i = mean-token (logp - ref) over row i's completion tokens (`length_norm="sequence"`,
    METHOD.md) or its sum (`"none"`). See `listwise_kl` for the loss and its gradient
    beta (q_i - d_i) / G w.r.t. l_i. No ratio, no clipping, no separate KL penalty: l is
    itself measured against the reference. Metrics: the loss, `log_ratio` (mean per-token
    logp - ref over grouped rows: on the sampled tokens, not a KL, and it can be negative)
    and `top1_agreement` (share of groups where q and d have
    the same argmax, first index on ties).
    """
    logp, ref, mask = _rows(x, "grpo-distribution")
    if cfg.length_norm not in _SEQUENCE_SCORE:
        raise ValueError(
            f"LossConfig.length_norm {cfg.length_norm!r} does not apply to grpo-distribution: "
            f"use one of {tuple(_SEQUENCE_SCORE)}"
        )
    groups, target = _grouped(x, "grpo-distribution")
    rows = groups.reshape(-1)
    log_ratio = logp[rows] - ref[rows]
    seq_ratio = _SEQUENCE_SCORE[cfg.length_norm](log_ratio, mask[rows]).reshape(groups.shape)
    loss, q = listwise_kl(seq_ratio, target, beta=cfg.beta)
    metrics = _floats(
        loss=loss,
        log_ratio=_token_mean(log_ratio, mask[rows]),
        top1_agreement=(q.argmax(-1) == target.argmax(-1)).float().mean(),
    )
    return LossOutput(loss=loss, metrics=metrics)


LOSSES: dict[str, Callable[[LossInputs, LossConfig], LossOutput]] = {
    "dpo": dpo_loss,
    "grpo-advantage": grpo_advantage_loss,
    "grpo-distribution": grpo_distribution_loss,
}
