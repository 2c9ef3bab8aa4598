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

This file holds loading, the adapter (policy / reference), training and persistence; sampling
is `torch_sampling.py` and the log-prob passes `torch_logprobs.py`, mixed into `TorchBackend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..algo.losses import LossInputs
from ..config import RunConfig, TrainConfig
from ..errors import EdgePuError
from .base import GRAD_CHECKPOINTING, NF4, SHARED_PREFILL, TrainBatch
from .torch_logprobs import LOGIT_CHUNK_BYTES, TorchLogprobs
from .torch_sampling import TorchSampling

__all__ = ["CPUBackend", "CUDABackend", "LOGIT_CHUNK_BYTES", "TorchBackend"]


def _pad(rows: Sequence[Sequence[float]], value: float = 0.0) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


class TorchBackend(TorchSampling, TorchLogprobs):
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
        from ..quant.auto import import_as_for
        from ..quant.student import resolve_student

        if self.device.type == "cpu":
            # Tight (RSS follows live tensors, as the planner predicts) unless memory is ample.
            threshold = cpu_allocator_threshold(cfg)
            if threshold:
                pin_cpu_allocator(threshold)
        self.cfg = cfg
        self.student_dir, source_quant = resolve_student(cfg.student.path,
                                                         import_as_for(cfg))
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

