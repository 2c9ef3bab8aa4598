"""The MLX backend's sampling: K candidates per prompt from one shared prefill.

`MLXSampling` is mixed into edge_pu.backends.mlx_backend.MLXBackend, whose loaded state it uses:
`model` (mlx-lm), `_split` and `_head` (the vocabulary projection run apart from the decoder),
`pad_id`, `eos_ids`, `decode` and `_adapter(enabled)` (the policy or the reference). The KV
cache of one prefill is repeated K times; a sample ends on the first EOS, which it keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from ..config import SamplingConfig
from .base import Sample


class MLXSampling:
    model: Any
    pad_id: int
    eos_ids: list[int]
    _split: bool
    _head: Callable[[mx.array], mx.array]
    decode: Callable[[Sequence[int]], str]

    def sample(self, prompt_ids: Sequence[list[int]], k: int, cfg: SamplingConfig,
               seeds: Sequence[int], *, adapter: bool = True) -> list[list[Sample]]:
        with self._adapter(adapter):
            return [self._sample_one(ids, k, cfg, seed)
                    for ids, seed in zip(prompt_ids, seeds, strict=True)]

    def _last_logits(self, ids: mx.array, cache: list[Any]) -> mx.array:
        if self._split:
            return self._head(self.model.model(ids, cache=cache)[:, -1]).astype(mx.float32)
        return self.model(ids, cache=cache)[:, -1].astype(mx.float32)

    def _sample_one(self, ids: list[int], k: int, cfg: SamplingConfig, seed: int
                    ) -> list[Sample]:
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        key = mx.random.key(seed)
        cache = make_prompt_cache(self.model)
        if all(type(c) is KVCache for c in cache):
            logits = self._last_logits(mx.array([ids]), cache)
            for c in cache:  # one prefill shared by the K candidates
                c.keys, c.values = mx.repeat(c.keys, k, axis=0), mx.repeat(c.values, k, axis=0)
            logits = mx.repeat(logits, k, axis=0)
        else:  # FIXME: rotating/hybrid caches are prefilled K times rather than shared
            logits = self._last_logits(mx.array([ids] * k), cache)
        eos = np.array(self.eos_ids)
        done = np.zeros(k, dtype=bool)
        steps: list[np.ndarray] = []
        for step in range(cfg.max_new_tokens):
            key, sub = mx.random.split(key)
            nxt = np.array(_draw(logits, cfg.temperature, cfg.top_p, sub)).astype(np.int64)
            nxt = np.where(done, self.pad_id, nxt)
            steps.append(nxt)
            done |= np.isin(nxt, eos)
            if done.all() or step == cfg.max_new_tokens - 1:
                break
            logits = self._last_logits(mx.array(nxt[:, None].astype(np.int32)), cache)
        tokens = np.stack(steps, axis=1).tolist() if steps else [[] for _ in range(k)]
        samples = []
        for row in tokens:
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            keep = row if end is None else row[: end + 1]
            samples.append(Sample(keep, self.decode(keep), end is not None))
        return samples


def _draw(logits: mx.array, temperature: float, top_p: float, key: mx.array) -> mx.array:
    if temperature <= 0:
        return mx.argmax(logits, axis=-1)
    probs = mx.softmax(logits / temperature, axis=-1)
    if top_p < 1.0:
        idx = mx.argsort(-probs, axis=-1)
        sorted_p = mx.take_along_axis(probs, idx, axis=-1)
        keep = (mx.cumsum(sorted_p, axis=-1) - sorted_p) < top_p
        probs = mx.put_along_axis(mx.zeros_like(probs), idx, sorted_p * keep, axis=-1)
    return mx.random.categorical(mx.log(probs), key=key)
