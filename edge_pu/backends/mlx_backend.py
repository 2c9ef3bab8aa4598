"""The MLX backend: Apple Silicon (Metal) or, with `pip install "mlx[cpu]"`, any Linux CPU.

Student = an mlx-lm model built from the HF dir that `resolve_student` gives, optionally
quantized with MLX's affine 4-bit scheme (`student.quant: mlx-affine-4`, group size 64, the
mlx-lm default), with LoRA layers in PEFT's layout on the (quantized) linear layers
(`mlx_lora.py`). The reference policy is the same model with the LoRA layers bypassed. Sampling,
log-probs and training all run on exactly these weights; the tokenizer and chat template are
transformers' AutoTokenizer, as in the torch backend, so both backends see the same token ids.

Semantics follow `torch_backend.py` (the reference; `tests/test_backend_contract.py` holds the
two together): log-probs only at completion positions, vocabulary projection in checkpointed
chunks; K samples per prompt share one prefill (the KV cache is repeated K times); a sample ends
on the first EOS, which it keeps; AdamW with bias correction, torch's grad-norm clipping and
linear warmup. Losses run in MLX (`mlx_losses.py`); an injected loss with no MLX mirror runs in
torch on the per-token log-probs, and its gradient comes back through a second forward pass.
`save_adapter` writes a PEFT adapter that `peft.PeftModel.from_pretrained` loads; `merge`
writes a dense HF dir: the dequantized base plus the LoRA delta, i.e. exactly the trained policy.

This file holds loading, the adapter (policy / reference), training and persistence; sampling
is `mlx_sampling.py` and the log-prob passes `mlx_logprobs.py`, mixed into `MLXBackend`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config import RunConfig
from ..errors import EdgePuError
from .base import GRAD_CHECKPOINTING, MLX_AFFINE, SHARED_PREFILL, TrainBatch
from .mlx_logprobs import MLXLogprobs
from .mlx_lora import (
    add_lora,
    dense_weights,
    load_arrays,
    load_peft,
    lora_layers,
    peft_config,
    save_peft,
)
from .mlx_losses import MLXLossInputs, mlx_loss_for
from .mlx_sampling import MLXSampling

# Affine 4-bit with mlx-lm's default group size; a layer whose in-dim 64 does not divide stays
# in the compute dtype (reported at load). The tiny test models use multiples of 64 throughout.
GROUP_SIZE = 64
BITS = 4
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16}


class MLXBackend(MLXSampling, MLXLogprobs):
    name = "mlx"

    def __init__(self) -> None:
        self.capabilities = frozenset({MLX_AFFINE, SHARED_PREFILL, GRAD_CHECKPOINTING})
        self.quant_format = "none"
        self.optimizer: optim.AdamW | None = None
        self.step = 0  # optimizer steps taken (drives warmup, saved with the state)
        # (lora_a, lora_b) per LoRA layer of the reference policy when it is not the base
        # (after the SFT stage); None: the reference is the base (adapter disabled).
        self.reference: list[tuple[mx.array, mx.array]] | None = None

    # ---- loading ---------------------------------------------------------------------------
    def load(self, cfg: RunConfig) -> None:
        from mlx_lm.utils import load_config, load_model
        from transformers import AutoTokenizer

        from ..quant.auto import import_as_for
        from ..quant.student import resolve_student

        self.cfg = cfg
        self.student_dir, source_quant = resolve_student(cfg.student.path,
                                                         import_as_for(cfg))
        trust = cfg.student.trust_remote_code
        try:
            self.tok = AutoTokenizer.from_pretrained(self.student_dir, trust_remote_code=trust)
            hf_config = load_config(self.student_dir)
            rope = _rope_overrides(hf_config)
            # trust_remote_code only when asked: older mlx-lm releases lack the argument.
            model, _ = load_model(self.student_dir, model_config=rope, trust_remote_code=True) \
                if trust else load_model(self.student_dir, model_config=rope)
        except (OSError, ValueError, KeyError) as exc:
            raise EdgePuError(f"student.path {cfg.student.path}: mlx-lm could not load the "
                              f"model ({type(exc).__name__}: {exc}).") from None
        vocab = int(hf_config.get("vocab_size", 0) or hf_config.get("text_config", {})
                    .get("vocab_size", 0))
        if vocab and len(self.tok) > vocab:
            raise EdgePuError(f"student.path {cfg.student.path}: tokenizer has {len(self.tok)} "
                              f"tokens but the model's vocab_size is {vocab}; they do not "
                              "belong together.")
        if self.tok.chat_template is None:
            raise EdgePuError(f"student.path {cfg.student.path}: the tokenizer has no chat "
                              "template; edge_pu needs an instruct/chat student.")
        model.set_dtype(DTYPES[cfg.student.dtype])
        if cfg.student.quant == "mlx-affine-4":
            self.dense_layers = _quantize(model)
            self.quant_format = "mlx-affine-4"
        elif cfg.student.quant == "none":
            self.dense_layers = []
            self.quant_format = source_quant
        else:
            raise EdgePuError(f"config: student.quant {cfg.student.quant!r} is not available "
                              "on the mlx backend; use mlx-affine-4 or none.")
        mx.random.seed(cfg.train.seed)
        lc = cfg.lora
        self.lora_paths = add_lora(model, tuple(lc.target_modules), lc.r, lc.alpha, lc.dropout)
        model.eval()
        mx.eval(model.parameters())
        self.model = model
        self.reference = None
        self.optimizer = None
        self.step = 0
        self._split = self._check_split_head()
        if cfg.train.gradient_checkpointing:
            _checkpoint_layers(self.model)
        self.eos_ids = self._eos_ids(hf_config)
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else \
            self.eos_ids[0]

    def _eos_ids(self, hf_config: dict[str, Any]) -> list[int]:
        # load_config already folds generation_config.json's eos_token_id into the config,
        # which is what transformers' model.generation_config gives the torch backend.
        ids = hf_config.get("eos_token_id")
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        return ids

    def _check_split_head(self) -> bool:
        """Can log-probs run the decoder and the head separately (so the head runs only at
        completion positions)? True for mlx-lm's Llama/Qwen2-style models; checked on a probe,
        since some architectures scale or cap their logits after the head."""
        inner = getattr(self.model, "model", None)
        if inner is None or not hasattr(inner, "embed_tokens"):
            return False
        probe = mx.array([[1, 2, 3]])
        try:
            split = self._head(inner(probe))
        except (TypeError, AttributeError, ValueError):
            return False
        return bool(mx.allclose(split, self.model(probe), atol=1e-4, rtol=1e-4).item())

    def _head(self, h: mx.array) -> mx.array:
        if "lm_head" in self.model:
            return self.model.lm_head(h)
        return self.model.model.embed_tokens.as_linear(h)

    # ---- tokens (same calls as the torch backend) ------------------------------------------
    def chat_ids(self, messages: list[dict[str, str]], *, assistant: str | None = None
                 ) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
        out = cast(list[int], list(ids["input_ids"] if isinstance(ids, dict) else ids))
        return out + self.token_ids(assistant) if assistant else out

    def token_ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    # ---- adapter on/off --------------------------------------------------------------------
    @contextlib.contextmanager
    def _adapter(self, enabled: bool) -> Iterator[None]:
        if not enabled and self.reference is not None:
            with self._swapped(self.reference):
                yield
            return
        layers = [m for _, m in lora_layers(self.model)]
        before = [m.enabled for m in layers]
        for m in layers:
            m.enabled = enabled
        try:
            yield
        finally:
            for m, state in zip(layers, before, strict=True):
                m.enabled = state

    @contextlib.contextmanager
    def _swapped(self, weights: list[tuple[mx.array, mx.array]]) -> Iterator[None]:
        layers = [m for _, m in lora_layers(self.model)]
        saved = [(m.lora_a, m.lora_b) for m in layers]
        for m, (a, b) in zip(layers, weights, strict=True):
            m.lora_a, m.lora_b = a, b
        try:
            yield
        finally:
            for m, (a, b) in zip(layers, saved, strict=True):
                m.lora_a, m.lora_b = a, b

    def set_reference(self) -> None:
        """The current adapter becomes the reference policy (see the torch backend)."""
        self.reference = [(m.lora_a, m.lora_b) for _, m in lora_layers(self.model)]

    def clear_reference(self) -> None:
        self.reference = None

    def policy_is_reference(self) -> bool:
        layers = [m for _, m in lora_layers(self.model)]
        if self.reference is None:
            return all(not bool(mx.any(m.lora_b).item()) for m in layers)
        return all(bool(mx.array_equal(m.lora_a, a).item() and mx.array_equal(m.lora_b, b)
                        .item()) for m, (a, b) in zip(layers, self.reference, strict=True))

    def reset_optimizer(self, train: Any) -> None:
        """A fresh optimizer and warmup for the next stage, with its own hyperparameters."""
        import dataclasses

        self.cfg = dataclasses.replace(self.cfg, train=train)
        self.optimizer = None
        self.step = 0

    # ---- training --------------------------------------------------------------------------
    def _ensure_optimizer(self) -> None:
        if self.optimizer is None:
            t = self.cfg.train
            # bias_correction=True is torch's AdamW; mlx defaults to False.
            self.optimizer = optim.AdamW(learning_rate=t.lr, weight_decay=t.weight_decay,
                                         bias_correction=True)

    def _lr(self, step: int) -> float:
        t = self.cfg.train
        warm = max(t.warmup_steps, 0)
        return t.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)

    def _inputs(self, mb: TrainBatch, token_logp: mx.array, mask: mx.array) -> MLXLossInputs:
        width = mask.shape[1]
        return MLXLossInputs(
            token_logp=token_logp, mask=mask,
            ref_token_logp=mx.array(_pad(mb.ref_token_logp, width)),
            old_token_logp=mx.array(_pad(mb.old_token_logp, width)) if mb.old_token_logp
            else None,
            pairs=mx.array(mb.pairs, dtype=mx.int32).reshape(-1, 2) if mb.pairs else None,
            groups=mx.array(mb.groups, dtype=mx.int32) if mb.groups else None,
            target=mx.array(mb.target, dtype=mx.float32) if mb.target else None)

    def train_step(self, micro_batches: Sequence[TrainBatch], loss_fn: Callable[..., Any],
                   loss_cfg: Any) -> dict[str, float]:
        if not micro_batches:
            raise ValueError("train_step needs at least one micro-batch")
        self._ensure_optimizer()
        assert self.optimizer is not None
        mirror = mlx_loss_for(loss_fn)
        # Dropout masks are a pure function of (seed, step), so a resumed run replays them.
        mx.random.seed(self.cfg.train.seed * 1_000_003 + self.step)
        self.model.train()
        totals: dict[str, float] = {}
        acc: Any = None
        try:
            for mb in micro_batches:
                if mirror is not None:
                    def fn(mb: TrainBatch = mb) -> tuple[mx.array, dict[str, mx.array]]:
                        lp, mask = self._token_logp(mb.prompt_ids, mb.completion_ids, train=True)
                        return mirror(self._inputs(mb, lp, mask), loss_cfg)

                    (_, metrics), grads = nn.value_and_grad(self.model, fn)()
                    mx.eval(grads, metrics)
                    values = {k: float(v.item()) for k, v in metrics.items()}
                else:
                    values, grads = self._bridge_grads(mb, loss_fn, loss_cfg)
                acc = tree_map(lambda g, w=mb.weight: g * w, grads) if acc is None else \
                    tree_map(lambda a, g, w=mb.weight: a + g * w, acc, grads)
                mx.eval(acc)
                for key, value in values.items():
                    totals[key] = totals.get(key, 0.0) + value * mb.weight
            clipped, norm = optim.clip_grad_norm(acc, self.cfg.train.max_grad_norm)
            self.optimizer.learning_rate = mx.array(self._lr(self.step))
            self.optimizer.update(self.model, clipped)
            mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        finally:
            self.model.eval()
        self.step += 1
        totals["grad_norm"] = float(norm.item())
        totals["lr"] = self._lr(self.step)
        return totals

    def _bridge_grads(self, mb: TrainBatch, loss_fn: Callable[..., Any], loss_cfg: Any
                      ) -> tuple[dict[str, float], Any]:
        """A torch loss with no MLX mirror: dL/d(token log-probs) from torch, then the model
        gradient as the gradient of sum(token_logp * that), a second forward in MLX."""
        import torch

        from ..algo.losses import LossInputs

        lp, mask = self._token_logp(mb.prompt_ids, mb.completion_ids)
        t_lp = torch.tensor(np.array(lp), requires_grad=True)
        t_mask = torch.tensor(np.array(mask))
        width = t_mask.shape[1]
        x = LossInputs(
            token_logp=t_lp, ref_token_logp=torch.tensor(_pad(mb.ref_token_logp, width)),
            mask=t_mask,
            old_token_logp=torch.tensor(_pad(mb.old_token_logp, width)) if mb.old_token_logp
            else None,
            pairs=torch.tensor(mb.pairs).view(-1, 2) if mb.pairs else None,
            groups=torch.tensor(mb.groups) if mb.groups else None,
            target=torch.tensor(mb.target) if mb.target else None)
        out = loss_fn(x, loss_cfg)
        out.loss.backward()
        assert t_lp.grad is not None
        cot = mx.array(t_lp.grad.numpy())

        def surrogate() -> mx.array:
            lp2, _ = self._token_logp(mb.prompt_ids, mb.completion_ids, train=True)
            return (lp2 * cot).sum()

        _, grads = nn.value_and_grad(self.model, surrogate)()
        mx.eval(grads)
        return dict(out.metrics), grads

    # ---- persistence -----------------------------------------------------------------------
    def _peft_config(self) -> dict[str, Any]:
        lc = self.cfg.lora
        return peft_config(tuple(lc.target_modules), lc.r, lc.alpha, lc.dropout,
                           str(self.student_dir))

    def save_adapter(self, path: Path) -> None:
        save_peft(self.model, path, self._peft_config())
        self.tok.save_pretrained(str(path))

    def load_adapter(self, path: Path) -> None:
        """Adopt a PEFT adapter dir (from this or the torch backend) as the current LoRA."""
        load_peft(self.model, path)

    def save_state(self, path: Path) -> None:
        """Adapter + optimizer state + step count, for resume; COMPLETE is written last."""
        from ..jsonl import write_atomic

        path.mkdir(parents=True, exist_ok=True)
        save_peft(self.model, path / "adapter", self._peft_config())
        if self.optimizer is not None:
            state = dict(tree_flatten(self.optimizer.state))
            tmp = path / "optimizer.tmp.safetensors"
            mx.save_safetensors(str(tmp), state)
            tmp.replace(path / "optimizer.safetensors")
        write_atomic(path / "trainer.json", json.dumps({"step": self.step}) + "\n")
        write_atomic(path / "COMPLETE", "ok\n")

    def load_state(self, path: Path) -> None:
        load_peft(self.model, path / "adapter")
        if (path / "optimizer.safetensors").exists():
            self._ensure_optimizer()
            assert self.optimizer is not None
            flat = load_arrays(path / "optimizer.safetensors")
            self.optimizer.state = tree_unflatten(list(flat.items()))
        if (path / "trainer.json").exists():
            self.step = int(json.loads((path / "trainer.json").read_text())["step"])

    def merge(self, out_dir: Path) -> Path:
        """Dense HF dir = dequantized base + LoRA delta, in each tensor's original dtype.

        Merged into the weights the adapter was trained on (for mlx-affine-4, the dequantized
        4-bit base, not the original fp base), so the merged model is the trained policy.
        Export then re-quantizes it with the target format's quantizer.
        """
        dense = dense_weights(self.model)
        original = _load_safetensors(self.student_dir)
        merged_keys = {f"{p}.weight" for p in self.lora_paths}
        lost = sorted(merged_keys - set(original))
        if lost:
            raise EdgePuError(f"merge: the LoRA layers {lost[:3]} have no weight of that name "
                              f"in {self.student_dir}; mlx-lm renamed them for this "
                              "architecture, so merge with the torch backend instead.")
        out = {k: dense.get(k, v).astype(v.dtype) for k, v in original.items()}
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        mx.save_safetensors(str(tmp / "model.safetensors"), out, metadata={"format": "pt"})
        config = json.loads((self.student_dir / "config.json").read_text())
        for key in ("quantization", "quantization_config"):
            config.pop(key, None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (self.student_dir / "generation_config.json").exists():
            shutil.copy(self.student_dir / "generation_config.json", tmp)
        self.tok.save_pretrained(str(tmp))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.replace(out_dir)
        return out_dir


def _rope_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 saves rope_theta inside `rope_parameters`, which mlx-lm's Llama and Qwen2
    ignore (they would fall back to their own default theta, 1e4 or 1e6); lift it out."""
    rp = config.get("rope_parameters")
    if not isinstance(rp, dict) or "rope_theta" not in rp or "rope_theta" in config:
        return {}
    out: dict[str, Any] = {"rope_theta": rp["rope_theta"]}
    if rp.get("rope_type", "default") != "default" and config.get("rope_scaling") is None:
        out["rope_scaling"] = rp
    return out


def _quantize(model: nn.Module) -> list[str]:
    """Affine 4-bit, group 64, every linear/embedding layer whose in-dim 64 divides (mlx-lm's
    convert does the same); returns the paths of the layers left in the compute dtype."""
    skipped: list[str] = []

    def predicate(path: str, m: nn.Module) -> bool:
        if not hasattr(m, "to_quantized"):
            return False
        if m.weight.shape[-1] % GROUP_SIZE:
            skipped.append(path)
            return False
        return True

    nn.quantize(model, group_size=GROUP_SIZE, bits=BITS, mode="affine",
                class_predicate=predicate)
    if skipped:
        print(f"[mlx] {len(skipped)} layers stay unquantized (in-dim not a multiple of "
              f"{GROUP_SIZE}): {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}",
              flush=True)
    return skipped


def _checkpoint_layers(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass while training. The layer objects
    get a subclass of their own type (mlx-lm's grad_checkpoint patches the class itself, for
    every model in the process, and also at inference); parameter names do not change."""
    for layer in getattr(getattr(model, "model", None), "layers", None) or []:
        cls = type(layer)
        if cls.__name__.startswith("Checkpointed"):
            continue
        sub = _CHECKPOINTED.get(cls)
        if sub is None:
            sub = _CHECKPOINTED[cls] = type(f"Checkpointed{cls.__name__}", (cls,),
                                            {"__call__": _checkpointed_call})
        layer.__class__ = sub


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_call(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    call = super(type(self), self).__call__  # type: ignore[misc]
    if not self.training:
        return call(*args, **kwargs)

    def inner(params: Any, *args: Any, **kwargs: Any) -> Any:
        self.update(params)
        return call(*args, **kwargs)

    return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)


def _pad(rows: Sequence[Sequence[float]] | None, width: int) -> np.ndarray:
    out = np.zeros((len(rows or []), width), dtype=np.float32)
    for i, r in enumerate(rows or []):
        n = min(len(r), width)
        out[i, :n] = r[:n]
    return out


def _load_safetensors(model_dir: Path) -> dict[str, mx.array]:
    files = sorted(model_dir.glob("model*.safetensors"))
    if not files:
        raise EdgePuError(f"merge: no model*.safetensors in {model_dir}.")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(load_arrays(f))
    return weights
