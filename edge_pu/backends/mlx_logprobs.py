"""The MLX backend's log-probs: only at completion positions, the vocabulary projection in
checkpointed chunks while training.

`MLXLogprobs` is mixed into edge_pu.backends.mlx_backend.MLXBackend, whose loaded state it uses:
`model` (mlx-lm), `_split` and `_head` (the vocabulary projection run apart from the decoder),
`pad_id` and `_adapter(enabled)` (the policy or the reference). Training (`_token_logp` with
`train=True`) and scoring (`logprobs`, `next_token_logprobs`) share these paths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

LOGIT_CHUNK_BYTES = 64 * 2**20  # peak size of one chunk of fp32 logits, as in the torch backend


class MLXLogprobs:
    model: Any
    pad_id: int
    _split: bool
    _head: Callable[[mx.array], mx.array]

    def _token_logp(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]],
                    *, train: bool = False) -> tuple[mx.array, mx.array]:
        """[B, T] log-prob of each completion token (differentiable) and its float mask."""
        seqs = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
        width = max(len(s) for s in seqs)
        t = max(1, max(len(c) for c in completion_ids))
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int32)
        pos = np.zeros((len(seqs), t), dtype=np.int32)  # hidden state that predicts each token
        mask = np.zeros((len(seqs), t), dtype=np.float32)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            ids[i, : len(p) + len(c)] = p + c
            pos[i, : len(c)] = np.arange(len(p) - 1, len(p) + len(c) - 1)
            mask[i, : len(c)] = 1.0
        targets = mx.array(np.take_along_axis(ids, pos + 1, axis=1))
        # Right padding with a causal mask: no real token ever attends to a pad.
        x = mx.array(ids)
        if not self._split:
            logits = self.model(x).astype(mx.float32)
            h = mx.take_along_axis(logits, mx.array(pos)[..., None], axis=1)
            return _gather_logp(h, targets) * mx.array(mask), mx.array(mask)
        hidden = self.model.model(x)
        h = mx.take_along_axis(hidden, mx.array(pos)[..., None], axis=1)  # [B, T, H]
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        vocab = self._head(flat_h[:1]).shape[-1]
        chunk = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
        head_fn = _chunk_fn(self) if train else None
        parts = []
        for s in range(0, flat_h.shape[0], chunk):
            hc, tc = flat_h[s: s + chunk], flat_t[s: s + chunk]
            if head_fn is not None:
                parts.append(head_fn(self.model.trainable_parameters(), hc, tc))
            else:
                parts.append(_gather_logp(self._head(hc).astype(mx.float32), tc))
        lp = mx.concatenate(parts).reshape(len(seqs), t)
        return lp * mx.array(mask), mx.array(mask)

    def logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
                 adapter: bool = True) -> list[list[float]]:
        with self._adapter(adapter):
            lp, _ = self._token_logp(prompt_ids, completion_ids)
            rows = np.array(lp).tolist()
        return [rows[i][: len(c)] for i, c in enumerate(completion_ids)]

    def next_token_logprobs(self, prompt_ids: Sequence[list[int]], candidates: Sequence[int], *,
                            adapter: bool = True) -> list[list[float]]:
        width = max(len(p) for p in prompt_ids)
        ids = np.full((len(prompt_ids), width), self.pad_id, dtype=np.int32)
        for i, p in enumerate(prompt_ids):  # right padding; each row is read at its own end
            ids[i, : len(p)] = p
        last = mx.array([len(p) - 1 for p in prompt_ids])[:, None, None]
        with self._adapter(adapter):
            if self._split:
                h = mx.take_along_axis(self.model.model(mx.array(ids)), last, axis=1)[:, 0]
                logits = self._head(h).astype(mx.float32)
            else:
                logits = mx.take_along_axis(self.model(mx.array(ids)), last, axis=1)[:, 0]
            logits = logits.astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            out = np.array(logp[:, mx.array(list(candidates))])
        return out.tolist()


def _gather_logp(logits: mx.array, targets: mx.array) -> mx.array:
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)


def _chunk_fn(backend: Any) -> Callable[..., mx.array]:
    """Head + log-softmax of one chunk, recomputed in the backward pass (mlx-lm's pattern:
    the trainable parameters go in as an argument so their gradient flows through)."""
    model = backend.model

    def inner(params: Any, h: mx.array, t: mx.array) -> mx.array:
        model.update(params)
        # t is integer token ids: no gradient, and checkpoint would otherwise ask for one.
        return _gather_logp(backend._head(h).astype(mx.float32), mx.stop_gradient(t))

    return mx.checkpoint(inner)
