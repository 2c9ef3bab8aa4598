"""The torch backend's log-probs: only at completion positions, the vocabulary projection a
chunk at a time, each distinct prompt run once.

`TorchLogprobs` is mixed into edge_pu.backends.torch_backend.TorchBackend, whose loaded state it
uses: `model` (transformers + PEFT), `cfg`, `device`, `pad_id`, `_cache_kw` (the name of the KV
cache in the model's outputs) and `_adapter(enabled)` (the policy or the reference). Training
(`_token_logp`, with gradient) and scoring (`logprobs`, `next_token_logprobs`) share these paths.
The [tokens x vocab] logits never exist at once: `_head_logp` projects LOGIT_CHUNK_BYTES of them
at a time (edge_pu.planner counts one chunk).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..config import RunConfig

LOGIT_CHUNK_BYTES = 64 * 2**20  # peak size of one chunk of fp32 logits


class TorchLogprobs:
    model: Any
    cfg: RunConfig
    device: torch.device
    pad_id: int
    _cache_kw: str

    def _token_logp(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T] log-prob of each completion token (grad flows if enabled) and its mask."""
        if self.model.training and self.cfg.train.gradient_checkpointing:
            return self._whole_rows_logp(prompt_ids, completion_ids)
        return self._shared_prefix_logp(prompt_ids, completion_ids)

    def _whole_rows_logp(self, prompt_ids: Sequence[list[int]],
                         completion_ids: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """`_token_logp` with each row run as prompt + completion in one padded batch."""
        seqs = [p + c for p, c in zip(prompt_ids, completion_ids, strict=True)]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        rows, pos, cols = [], [], []
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids, strict=True)):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attn[i, : len(p) + len(c)] = 1
            rows += [i] * len(c)
            pos += range(len(p) - 1, len(p) + len(c) - 1)  # hidden state that predicts token
            cols += range(len(c))
        ids, attn = ids.to(self.device), attn.to(self.device)
        base = self.model.get_base_model()
        hidden = base.get_decoder()(input_ids=ids, attention_mask=attn).last_hidden_state
        r = torch.tensor(rows, device=self.device)
        h = hidden[r, torch.tensor(pos, device=self.device)]
        targets = ids[r, torch.tensor(pos, device=self.device) + 1]
        flat = self._head_logp(h, targets)
        width_c = max(len(c) for c in completion_ids)
        out = torch.zeros((len(seqs), max(width_c, 1)), device=self.device, dtype=torch.float32)
        mask = torch.zeros_like(out)
        c = torch.tensor(cols, device=self.device)
        out = out.index_put((r, c), flat.float())
        mask[r, c] = 1.0
        return out, mask

    def _shared_prefix_logp(self, prompt_ids: Sequence[list[int]],
                            completion_ids: Sequence[list[int]]
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """`_token_logp` with each distinct prompt run once: the prompts, left-padded, in one
        pass that returns their KV cache; the cache gathered to one row per completion; then the
        completions, right-padded, attending to it. Completion token j is predicted by the
        prompt's last state (j = 0) or by completion state j - 1."""
        dev = self.device
        index: dict[tuple[int, ...], int] = {}
        row_prompt = [index.setdefault(tuple(p), len(index)) for p in prompt_ids]
        prompts = list(index)
        width_p = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width_p), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left-padded: every prompt ends in the last column
            ids[i, width_p - len(p):] = torch.tensor(p)
            attn[i, width_p - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        base = self.model.get_base_model()
        decoder = base.get_decoder()
        pre = decoder(input_ids=ids.to(dev), attention_mask=attn.to(dev),
                      position_ids=pos.to(dev), use_cache=True)
        cache = getattr(pre, self._cache_kw)
        gather = torch.tensor(row_prompt, device=dev)
        if row_prompt != list(range(len(prompts))):  # some prompt serves several rows
            cache.reorder_cache(gather)  # index_select per layer: differentiable
        width = max(1, max(len(c) for c in completion_ids))
        cids = torch.full((len(completion_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(completion_ids), width), dtype=torch.float32)
        cpos = torch.empty_like(cids)
        for i, c in enumerate(completion_ids):
            cids[i, : len(c)] = torch.tensor(c)
            mask[i, : len(c)] = 1.0
            n = len(prompts[row_prompt[i]])
            cpos[i] = torch.arange(n, n + width)
        cids, mask = cids.to(dev), mask.to(dev)
        full_attn = torch.cat([attn.to(dev)[gather], mask.long()], dim=1)
        hid = decoder(input_ids=cids, attention_mask=full_attn, position_ids=cpos.to(dev),
                      use_cache=True, **{self._cache_kw: cache}).last_hidden_state
        first = pre.last_hidden_state[gather, -1]
        states = torch.cat([first[:, None], hid[:, :-1]], dim=1)
        real = mask.reshape(-1).bool()
        flat = self._head_logp(states.reshape(-1, states.shape[-1])[real], cids.reshape(-1)[real])
        out = torch.zeros(mask.shape, device=dev, dtype=torch.float32)
        out = out.masked_scatter(mask.bool(), flat.float())
        return out, mask

    def _head_logp(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(target) for each row of final hidden states, a chunk of the vocabulary
        projection at a time (each chunk checkpointed when grad is on)."""
        head = self.model.get_base_model().get_output_embeddings()
        chunk = max(1, LOGIT_CHUNK_BYTES // (4 * head.weight.shape[0]))
        parts = []
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s: s + chunk], targets[s: s + chunk]
            if torch.is_grad_enabled():
                parts.append(checkpoint(_chunk_logp, head, hc, tc, use_reentrant=False))
            else:
                parts.append(_chunk_logp(head, hc, tc))
        return torch.cat(parts) if parts else h.new_zeros(0)

    def logprobs(self, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], *,
                 adapter: bool = True) -> list[list[float]]:
        """One prompt's rows at a time (a group's KV cache, gathered per row, is the largest
        thing a scoring pass holds; the planner counts one group's), except that the rows
        whose prompt no other row shares (the recall ranker's: prompt + draft, then the
        anchor) go through together as whole padded rows: one pass at B x T token rows runs
        the matrix products ~1.6x faster here than B passes of T (bench/step_flops.py), and
        the planner counts this call's rows whole (ranker.batch_size x T)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompt_ids):
            groups.setdefault(tuple(p), []).append(i)
        out: list[list[float]] = [[] for _ in completion_ids]
        single = [rows[0] for rows in groups.values() if len(rows) == 1]
        with torch.no_grad(), self._adapter(adapter):
            if len(single) > 1:
                lp, _ = self._whole_rows_logp([prompt_ids[i] for i in single],
                                              [completion_ids[i] for i in single])
                for j, i in enumerate(single):
                    out[i] = lp[j, : len(completion_ids[i])].tolist()
                groups = {p: rows for p, rows in groups.items() if len(rows) > 1}
            for prompt, rows in groups.items():
                comps = [completion_ids[i] for i in rows]
                lp, _ = self._shared_prefix_logp([list(prompt)] * len(rows), comps)
                for j, i in enumerate(rows):
                    out[i] = lp[j, : len(comps[j])].tolist()
        return out

    @torch.no_grad()
    def next_token_logprobs(self, prompt_ids: Sequence[list[int]], candidates: Sequence[int], *,
                            adapter: bool = True) -> list[list[float]]:
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompt_ids):  # left-pad so the last column is each prompt's end
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        with self._adapter(adapter):
            logits = self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                position_ids=pos.to(self.device), logits_to_keep=1).logits
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        return logp[:, list(candidates)].tolist()


def _chunk_logp(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
