"""The torch backend's sampling: K candidates per prompt from one shared prefill.

`TorchSampling` is mixed into edge_pu.backends.torch_backend.TorchBackend, whose loaded state it
uses: `model` (transformers + PEFT), `device`, `pad_id`, `eos_ids`, `_cache_kw` (the name of the
KV cache in the model's outputs), `decode` and `_adapter(enabled)` (the policy or the reference).
`_draw` picks each row's next token by inverse CDF over the top-p head of the vocabulary, from
the prompt's own seeded generator, so a prompt's samples do not depend on its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..config import SamplingConfig
from .base import Sample


class TorchSampling:
    model: Any
    device: torch.device
    pad_id: int
    eos_ids: list[int]
    _cache_kw: str

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[list[int]], k: int, cfg: SamplingConfig,
               seeds: Sequence[int], *, adapter: bool = True) -> list[list[Sample]]:
        out: list[list[Sample]] = []
        with self._adapter(adapter):
            for s in range(0, len(prompt_ids), cfg.prompt_batch):
                out += self._sample_batch(prompt_ids[s: s + cfg.prompt_batch], k, cfg,
                                          seeds[s: s + cfg.prompt_batch])
        return out

    def _sample_batch(self, prompts: Sequence[list[int]], k: int, cfg: SamplingConfig,
                      seeds: Sequence[int]) -> list[list[Sample]]:
        """Left-pad the prompts, prefill them once, expand the cache to K rows each, decode.

        Each prompt draws from its own seeded generator (inverse-CDF sampling), so its samples
        do not depend on which other prompts share the batch.
        """
        dev = self.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        ids, attn, pos = ids.to(dev), attn.to(dev), pos.to(dev)
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                         logits_to_keep=1)  # only the last position's logits are needed
        cache = getattr(out, self._cache_kw)
        cache.batch_repeat_interleave(k)  # one prefill shared by each prompt's K candidates
        attn = attn.repeat_interleave(k, 0)
        pos = pos[:, -1:].repeat_interleave(k, 0)
        logits = out.logits[:, -1].float().repeat_interleave(k, 0)
        gens = [torch.Generator(device=dev).manual_seed(int(sd)) for sd in seeds]
        eos = torch.tensor(self.eos_ids, device=dev)
        done = torch.zeros(len(prompts) * k, dtype=torch.bool, device=dev)
        steps: list[torch.Tensor] = []
        for step in range(cfg.max_new_tokens):
            nxt = _draw(logits, cfg.temperature, cfg.top_p, gens, k)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            steps.append(nxt)
            done |= torch.isin(nxt, eos)
            if bool(done.all()) or step == cfg.max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            pos = pos + 1
            out = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos,
                             use_cache=True, **{self._cache_kw: cache})
            cache = getattr(out, self._cache_kw)
            logits = out.logits[:, -1].float()
        tokens = torch.stack(steps, dim=1).tolist()
        samples = []
        for row in tokens:
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            keep = row if end is None else row[: end + 1]
            samples.append(Sample(keep, self.decode(keep), end is not None))
        return [samples[i * k: (i + 1) * k] for i in range(len(prompts))]


def _draw(logits: torch.Tensor, temperature: float, top_p: float,
          gens: Sequence[torch.Generator], k: int) -> torch.Tensor:
    """Next token per row; rows [i*k, (i+1)*k) draw from generator i (inverse CDF)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    u = torch.cat([torch.rand(k, generator=g, device=logits.device) for g in gens])
    if top_p < 1.0:
        idx, p = _top_p_head(probs, top_p)
    else:
        idx, p = None, probs
    # Inverse CDF in vocabulary order (over the kept head, its indices ascending: the same
    # token as a cumsum over the whole vocabulary with the rest zeroed, without that cumsum).
    cdf = p.cumsum(-1)
    u = u * cdf[:, -1]  # renormalise: top-p dropped part of the mass
    pick = torch.searchsorted(cdf, u[:, None]).clamp(max=p.shape[-1] - 1)
    return (pick if idx is None else idx.gather(-1, pick))[:, 0]


def _top_p_head(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the smallest most-probable set of tokens whose mass reaches top_p (ties at the
    edge kept by rank), as (token ids ascending, their probs; zero-padded to a common width).
    Only a head of the vocabulary is ranked (topk of 64, widened 8x while a row's head falls
    short): a full sort of 49k-152k probabilities per token was the sampler's largest cost
    after the matrix products."""
    n, m = probs.shape[-1], min(64, probs.shape[-1])
    while True:
        head_p, head_i = probs.topk(m, dim=-1, sorted=True)
        if m == n or bool((head_p.sum(-1) >= top_p).all()):
            break
        m = min(n, m * 8)
    keep = head_p.cumsum(-1) - head_p < top_p
    idx = torch.where(keep, head_i, n)  # dropped slots sort last and carry no mass
    idx, order = idx.sort(dim=-1)
    p = (head_p * keep).gather(-1, order)
    return idx.clamp(max=n - 1), p
