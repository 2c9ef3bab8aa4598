"""The three training losses of `edge_pu.algo.losses`, written in MLX, line for line.

The torch losses cannot take mlx arrays, and sending the per-token log-probs to torch and the
gradient back would cost the MLX backend a second forward pass per micro-batch. So each loss is
mirrored here with the same maths, the same float32 rule (padding replaced by 0 before any
arithmetic) and the same metric names; `tests/test_backend_contract.py` checks each against its
torch original on hand-made inputs. `mlx_loss_for(loss_fn)` maps a function of `LOSSES` to its
mirror; any other injected loss gets None, and the backend then runs it in torch (see
`MLXBackend._bridge_grads`).

Inputs: `MLXLossInputs`, the fields of `LossInputs` as mx arrays. Output: (scalar loss, metrics
as 0-d mx arrays), so that one `mx.eval` computes the loss, its gradient and every metric.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

Metrics = dict[str, mx.array]
MLXLoss = Callable[["MLXLossInputs", Any], tuple[mx.array, Metrics]]


@dataclass
class MLXLossInputs:
    """`edge_pu.algo.losses.LossInputs` with mx arrays; same shapes, same meaning."""

    token_logp: mx.array  # [N, T] policy, differentiable
    ref_token_logp: mx.array  # [N, T] reference (adapter off)
    mask: mx.array  # [N, T] 1.0 on completion tokens
    old_token_logp: mx.array | None = None  # [N, T] sampling policy; None -> token_logp
    pairs: mx.array | None = None  # int [P, 2]
    groups: mx.array | None = None  # int [G, K]
    target: mx.array | None = None  # float [G, K]


def _masked(values: mx.array, mask: mx.array) -> mx.array:
    return mx.where(mask > 0, values, mx.zeros_like(values))


def sequence_logp(token_logp: mx.array, mask: mx.array) -> mx.array:
    return _masked(token_logp, mask).sum(-1)


def _mean_token(values: mx.array, mask: mx.array) -> mx.array:
    return _masked(values, mask).sum(-1) / mx.maximum(mask.sum(-1), 1.0)


def _token_mean(values: mx.array, mask: mx.array) -> mx.array:
    return _masked(values, mask).sum() / mx.maximum(mask.sum(), 1.0)


def _sequence_mean(values: mx.array, mask: mx.array) -> mx.array:
    return _mean_token(values, mask).mean()


def _rows(x: MLXLossInputs, loss: str) -> tuple[mx.array, mx.array, mx.array]:
    shape = x.token_logp.shape
    if x.token_logp.ndim != 2:
        raise ValueError(f"{loss}: token_logp must be [N, T], got shape {tuple(shape)}")
    for name in ("ref_token_logp", "mask", "old_token_logp"):
        other = getattr(x, name)
        if other is not None and other.shape != shape:
            raise ValueError(
                f"{loss}: {name} has shape {tuple(other.shape)}, token_logp {tuple(shape)}"
            )
    f32 = mx.float32
    return (x.token_logp.astype(f32), mx.stop_gradient(x.ref_token_logp).astype(f32),
            x.mask.astype(f32))


def _grouped(x: MLXLossInputs, loss: str) -> tuple[mx.array, mx.array]:
    if x.groups is None or x.target is None:
        raise ValueError(f"{loss} needs LossInputs.groups and LossInputs.target (GRPO groups)")
    groups, target = x.groups.astype(mx.int32), mx.stop_gradient(x.target).astype(mx.float32)
    if groups.ndim != 2 or groups.size == 0 or groups.shape != target.shape:
        raise ValueError(
            f"{loss}: groups {tuple(groups.shape)} and target {tuple(target.shape)} must be one "
            "non-empty [G, K] shape"
        )
    if bool(((groups < 0) | (groups >= x.token_logp.shape[0])).any().item()):
        raise ValueError(f"{loss}: groups index rows outside 0..{x.token_logp.shape[0] - 1}")
    sums = target.sum(-1)
    if (target < 0).any().item() or not mx.allclose(sums, mx.ones_like(sums), atol=1e-4).item():
        raise ValueError(f"{loss}: each target row must be a distribution (>= 0, sums to 1)")
    return groups, target


def dpo_loss(x: MLXLossInputs, cfg: Any) -> tuple[mx.array, Metrics]:
    """L = -mean_pairs log sigmoid(beta [(pi_w - ref_w) - (pi_l - ref_l)]), as in torch."""
    logp, ref, mask = _rows(x, "dpo")
    if x.pairs is None or x.pairs.size == 0:
        raise ValueError("dpo needs at least one (chosen, rejected) row pair in LossInputs.pairs")
    pairs = x.pairs.astype(mx.int32).reshape(-1, 2)
    reward = cfg.beta * (sequence_logp(logp, mask) - sequence_logp(ref, mask))
    chosen, rejected = reward[pairs[:, 0]], reward[pairs[:, 1]]
    margin = chosen - rejected
    loss = -nn.log_sigmoid(margin).mean()
    return loss, {
        "loss": loss,
        "reward_margin": margin.mean(),
        "reward_accuracy": (margin > 0).astype(mx.float32).mean(),
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
    }


def group_advantages(target: mx.array, eps: float = 1e-6,
                     adv_std: float = 0.0) -> mx.array:
    """A = (r - mean r) / (std r + eps) with r = K d, population std; 0 where std <= eps."""
    reward = target.shape[-1] * target
    std = mx.sqrt(mx.var(reward, axis=-1, keepdims=True))
    divisor = adv_std if adv_std > 0 else std + eps  # see edge_pu.algo.losses
    adv = (reward - reward.mean(axis=-1, keepdims=True)) / divisor
    return mx.where(std > eps, adv, mx.zeros_like(adv))


_AGGREGATE: dict[str, Callable[[mx.array, mx.array], mx.array]] = {
    "sequence": _sequence_mean,
    "token": _token_mean,
}


def grpo_advantage_loss(x: MLXLossInputs, cfg: Any) -> tuple[mx.array, Metrics]:
    """Clipped surrogate with A from r = K d, plus beta_kl times the k3 KL, as in torch."""
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
    old = mx.stop_gradient(old).astype(mx.float32)[rows]
    adv = group_advantages(target, cfg.eps, getattr(cfg, "adv_std", 0.0))
    adv_tok = adv.reshape(-1, 1)

    ratio = mx.exp(_masked(logp - old, mask))
    low, high = 1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps
    surrogate = mx.minimum(ratio * adv_tok, mx.clip(ratio, low, high) * adv_tok)
    ref_minus = _masked(ref - logp, mask)
    cap = getattr(cfg, "kl_cap", 0.0)
    if cap > 0:  # k3 continued along its tangent past ref - logp = cap (losses.k3_kl)
        inside = mx.minimum(ref_minus, cap)
        e = mx.exp(inside)
        kl = e - inside - 1.0 + (e - 1.0) * (ref_minus - inside)
        capped = (ref_minus > cap).astype(mx.float32)
    else:
        kl = mx.exp(ref_minus) - ref_minus - 1.0
        capped = mx.zeros_like(ref_minus)
    per_token = -(surrogate - cfg.beta_kl * kl)
    loss = _AGGREGATE[cfg.length_norm](per_token, mask)

    clipped = ((ratio < low) & (adv_tok < 0)) | ((ratio > high) & (adv_tok > 0))
    return loss, {
        "loss": loss,
        "kl": _token_mean(kl, mask),
        "clip_fraction": _token_mean(clipped.astype(mx.float32), mask),
        "kl_capped_fraction": _token_mean(capped, mask),
        "adv_abs_mean": mx.abs(adv).mean(),
        "zero_variance_groups": (mx.abs(adv).sum(-1) == 0).sum(),
    }


def listwise_kl(log_ratio: mx.array, target: mx.array, *, beta: float
                ) -> tuple[mx.array, mx.array]:
    """KL(d || softmax(beta l)) averaged over groups, with d log d = 0 at d = 0; (loss, q)."""
    scaled = beta * log_ratio
    log_q = scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)
    safe = mx.where(target > 0, target, mx.ones_like(target))
    xlogx = mx.where(target > 0, target * mx.log(safe), mx.zeros_like(target))
    per_group = (xlogx - target * log_q).sum(-1)
    return per_group.mean(), mx.exp(log_q)


_SEQUENCE_SCORE: dict[str, Callable[[mx.array, mx.array], mx.array]] = {
    "sequence": _mean_token,
    "none": lambda values, mask: _masked(values, mask).sum(-1),
}


def grpo_distribution_loss(x: MLXLossInputs, cfg: Any) -> tuple[mx.array, Metrics]:
    """KL(d || softmax(beta l)) within each group, l the (mean-token) log-ratio, as in torch."""
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
    return loss, {
        "loss": loss,
        "log_ratio": _token_mean(log_ratio, mask[rows]),
        "top1_agreement": (mx.argmax(q, -1) == mx.argmax(target, -1)).astype(mx.float32).mean(),
    }


MLX_LOSSES: dict[str, MLXLoss] = {
    "dpo": dpo_loss,
    "grpo-advantage": grpo_advantage_loss,
    "grpo-distribution": grpo_distribution_loss,
}
# The torch function each mirror stands for, by qualified name (so no torch import is needed).
_TORCH_NAMES = {
    "edge_pu.algo.losses.dpo_loss": "dpo",
    "edge_pu.algo.losses.grpo_advantage_loss": "grpo-advantage",
    "edge_pu.algo.losses.grpo_distribution_loss": "grpo-distribution",
}


def mlx_loss_for(loss_fn: Callable[..., Any]) -> MLXLoss | None:
    """The MLX mirror of a function of `edge_pu.algo.losses.LOSSES`, else None."""
    key = f"{getattr(loss_fn, '__module__', '')}.{getattr(loss_fn, '__qualname__', '')}"
    name = _TORCH_NAMES.get(key)
    return MLX_LOSSES[name] if name else None
