"""The torch backend: CPU (the reference path) and CUDA (QLoRA with bitsandbytes NF4).

Student = transformers causal LM + PEFT LoRA adapter. The reference policy is the same model
under `disable_adapter()`. Log-probs are computed only at completion positions and in chunks of
the vocabulary projection, each chunk checkpointed, so the [tokens x vocab] logits never exist
at once (in small models the vocabulary dominates memory). Sampling prefills each prompt once
and expands the KV cache to K rows; so does training and scoring: the rows of a unit (a DPO
pair, a GRPO group) share their prompt, which is run once (with gradient, in training) and its
KV cache handed to each row's completion tokens. A pair of 64-token answers to a 64-token prompt
is then 192 tokens of work, not 256 (forward + backward 1.6x faster on SmolLM2 here). With
gradient checkpointing transformers will not return a cache, so those runs take every row whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import distributed as dist
from ..algo.losses import LossInputs
from ..config import RunConfig, SamplingConfig, TrainConfig
from ..errors import EdgePuError
from .base import GRAD_CHECKPOINTING, NF4, SHARED_PREFILL, Sample, TrainBatch

LOGIT_CHUNK_BYTES = 64 * 2**20  # peak size of one chunk of fp32 logits


def _pad(rows: Sequence[Sequence[float]], value: float = 0.0) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


class TorchBackend:
    name = "cpu"
    device = torch.device("cpu")

    def __init__(self) -> None:
        self.capabilities = frozenset({NF4, GRAD_CHECKPOINTING, SHARED_PREFILL})
        self.quant_format = "none"
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        # The reference policy's LoRA weights when it is not the base (after the SFT stage):
        # `adapter=False` swaps them in. None: the reference is the base (adapter disabled).
        self.reference: dict[str, torch.Tensor] | None = None

    # ---- loading ---------------------------------------------------------------------------
    def load(self, cfg: RunConfig) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..planner import cpu_allocator_threshold, pin_cpu_allocator
        from ..quant.student import resolve_student

        if self.device.type == "cpu":
            # Tight (RSS follows live tensors, as the planner predicts) unless memory is ample.
            threshold = cpu_allocator_threshold(cfg)
            if threshold:
                pin_cpu_allocator(threshold)
        self.cfg = cfg
        self.student_dir, source_quant = resolve_student(cfg.student.path,
                                                         cfg.student.import_as)
        dtype = getattr(torch, cfg.student.dtype)
        kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True,
                                  "trust_remote_code": cfg.student.trust_remote_code}
        if cfg.student.quant == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16 if self.device.type == "cuda" else dtype)
            self.quant_format = "nf4"
        else:
            self.quant_format = source_quant
        try:
            self.tok = AutoTokenizer.from_pretrained(self.student_dir,
                                                     trust_remote_code=kwargs["trust_remote_code"])
            base = AutoModelForCausalLM.from_pretrained(self.student_dir, **kwargs)
        except (OSError, ValueError) as exc:
            raise EdgePuError(f"student.path {cfg.student.path}: could not load the model "
                              f"({exc}).") from None
        if len(self.tok) > base.config.vocab_size:
            raise EdgePuError(f"student.path {cfg.student.path}: tokenizer has {len(self.tok)} "
                              f"tokens but the model's vocab_size is {base.config.vocab_size}; "
                              "they do not belong together.")
        if self.tok.chat_template is None:
            raise EdgePuError(f"student.path {cfg.student.path}: the tokenizer has no chat "
                              "template; edge_pu needs an instruct/chat student.")
        if self.quant_format == "nf4":
            from ..quant.nf4 import exact_cpu_compute

            exact_cpu_compute(base)  # fp32 on CPU, as the merge's dequantized base computes
        base.to(self.device)
        if cfg.train.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant":
                                                                              False})
            base.enable_input_require_grads()
        linear = {n.rsplit(".", 1)[-1] for n, m in base.named_modules()
                  if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
        missing = [t for t in cfg.lora.target_modules if t not in linear]
        if missing:
            raise EdgePuError(f"config: lora.target_modules {missing} are not layers of this "
                              f"model; it has {sorted(linear)}.")
        torch.manual_seed(cfg.train.seed)
        lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lcfg)
        self.model.eval()
        self.reference = None
        self.optimizer = self.scheduler = None
        # transformers 5.2x renamed past_key_values to cache; accept both generations.
        params = inspect.signature(base.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.eos_ids = self._eos_ids(base)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else \
            self.eos_ids[0]

    def _eos_ids(self, base: Any) -> list[int]:
        ids = base.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        return ids

    # ---- tokens ----------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict[str, str]], *, assistant: str | None = None
                 ) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        return ids + self.token_ids(assistant) if assistant else ids

    def token_ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    # ---- sampling --------------------------------------------------------------------------
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

    # ---- log-probs -------------------------------------------------------------------------
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

    def _adapter(self, enabled: bool) -> Any:
        import contextlib

        if enabled:
            return contextlib.nullcontext()
        if self.reference is None:
            return self.model.disable_adapter()
        return self._swapped(self.reference)

    def _lora_params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    @contextlib.contextmanager
    def _swapped(self, weights: dict[str, torch.Tensor]) -> Iterator[None]:
        """The adapter's weights replaced in place by `weights`, restored on exit (no_grad:
        only the reference policy is evaluated this way, never trained)."""
        params = self._lora_params()
        with torch.no_grad():
            saved = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(saved[n])

    def set_reference(self) -> None:
        """The current adapter becomes the reference policy (and the frozen judge): after the
        SFT stage, `adapter=False` means the SFT policy, not the base. Training continues the
        same adapter, so the final adapter/ is one LoRA on the original base (TRL's
        ref_adapter_name does the same with two adapter copies)."""
        self.reference = {n: p.detach().clone() for n, p in self._lora_params().items()}

    def clear_reference(self) -> None:
        self.reference = None

    def lora_weights(self, adapter: bool) -> dict[str, torch.Tensor] | None:
        """The LoRA weights a call with `adapter` runs on: the policy's as they are now (not
        copied), the reference's, or None where that is the base (the adapter disabled)."""
        if adapter:
            if self.reference is None and self.policy_is_reference():  # every B zero
                return None
            return {n: p.detach() for n, p in self._lora_params().items()}
        return self.reference

    def save_adapter_for(self, adapter: bool, path: Path) -> None:
        """save_adapter of the policy (`adapter`) or of the reference policy's LoRA."""
        if adapter or self.reference is None:
            self.save_adapter(path)
            return
        with self._swapped(self.reference):
            self.save_adapter(path)

    def load_adapter(self, path: Path) -> None:
        """Adopt a PEFT adapter dir (saved by save_adapter/save_state) as the current LoRA."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(Path(path) /
                                                            "adapter_model.safetensors")))

    def reset_optimizer(self, train: TrainConfig) -> None:
        """A fresh optimizer and warmup for the next stage, with its own hyperparameters."""
        self.cfg = dataclasses.replace(self.cfg, train=train)
        self.optimizer = self.scheduler = None

    # ---- training --------------------------------------------------------------------------
    def _ensure_optimizer(self) -> None:
        if self.optimizer is not None:
            return
        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        warm = max(t.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)

    def train_step(self, micro_batches: Sequence[TrainBatch], loss_fn: Callable[..., Any],
                   loss_cfg: Any) -> dict[str, float]:
        """One optimizer step over the micro-batches (gradient accumulation, each weighted by
        its share of the step). In a torchrun job each rank runs every world-size-th
        micro-batch and the gradients and metrics are summed over the ranks before the
        clipping and the step, so every rank takes the single-process step."""
        self._ensure_optimizer()
        assert self.optimizer is not None and self.scheduler is not None
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        for mb in dist.shard(micro_batches):
            token_logp, mask = self._token_logp(mb.prompt_ids, mb.completion_ids)
            dev = self.device
            ref = _pad(mb.ref_token_logp).to(dev)[:, : mask.shape[1]]
            old = _pad(mb.old_token_logp).to(dev)[:, : mask.shape[1]] \
                if mb.old_token_logp else None
            x = LossInputs(
                token_logp=token_logp, ref_token_logp=ref, mask=mask, old_token_logp=old,
                pairs=torch.tensor(mb.pairs, device=dev).view(-1, 2) if mb.pairs else None,
                groups=torch.tensor(mb.groups, device=dev) if mb.groups else None,
                target=torch.tensor(mb.target, device=dev) if mb.target else None)
            out = loss_fn(x, loss_cfg)
            (out.loss * mb.weight).backward()
            for key, value in out.metrics.items():
                totals[key] = totals.get(key, 0.0) + value * mb.weight
        params = [p for p in self.model.parameters() if p.requires_grad]
        dist.all_reduce_grads(params)
        totals = dist.sum_metrics(totals)
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.model.eval()
        totals["grad_norm"] = float(norm)
        totals["lr"] = float(self.scheduler.get_last_lr()[0])
        return totals

    # ---- persistence -----------------------------------------------------------------------
    def save_adapter(self, path: Path) -> None:
        self.model.save_pretrained(str(path))
        self.tok.save_pretrained(str(path))

    def save_state(self, path: Path) -> None:
        """Adapter + optimizer + scheduler + RNG, for resume (written to a temp dir, renamed)."""
        from ..jsonl import write_atomic

        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(path / "adapter"))
        state = {"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                 "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                 "rng": torch.get_rng_state()}
        torch.save(state, path / "trainer.pt.tmp")
        (path / "trainer.pt.tmp").replace(path / "trainer.pt")
        write_atomic(path / "COMPLETE", "ok\n")

    def load_state(self, path: Path) -> None:
        self.load_adapter(path / "adapter")
        state = torch.load(path / "trainer.pt", weights_only=True)
        if state["optimizer"] is not None:
            self._ensure_optimizer()
            assert self.optimizer is not None and self.scheduler is not None
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])

    def policy_is_reference(self) -> bool:
        """True while the policy equals the reference exactly: every LoRA B zero (reference =
        base), or every LoRA weight equal to the reference's (just after the SFT stage)."""
        with torch.no_grad():
            if self.reference is None:
                return all(not bool(p.any()) for n, p in self.model.named_parameters()
                           if "lora_B" in n)
            return all(torch.equal(p, self.reference[n]) for n, p in self._lora_params().items())

    def merge(self, out_dir: Path) -> Path:
        from ..export.merge import merge_adapter

        tmp = out_dir.parent / (out_dir.name + ".adapter")
        self.save_adapter(tmp)
        base = self.student_dir
        if self.quant_format == "nf4":  # merge into the 4-bit weights training saw, dequantized
            from ..quant.nf4 import nf4_base_dir

            base = nf4_base_dir(self.student_dir)
        return merge_adapter(base, tmp, out_dir)


def _chunk_logp(head: torch.nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()
    return logits.gather(-1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


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


class CPUBackend(TorchBackend):
    name = "cpu"
    device = torch.device("cpu")


class CUDABackend(TorchBackend):
    name = "cuda"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise EdgePuError("backend: cuda was asked for, but torch sees no CUDA device "
                              f"(torch {torch.__version__}); use backend: cpu.")
        super().__init__()
        self.device = torch.device("cuda")

