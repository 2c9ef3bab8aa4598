"""The runtimes the export gate drives: torch (the reference), llama.cpp and onnxruntime.

Each runner offers the same three calls, so the gate compares them without caring which is
which:

    runner.logits(ids) -> np.ndarray [len(ids), vocab]   # logits at every prompt position
    runner.greedy(ids, n) -> list[int]                   # n argmax tokens (no EOS stop)
    runner.tokenize(text) -> list[int] | None            # the runtime's own tokenizer, if any

    TorchRunner(model)                                   # transformers / PEFT model, fp32
    LlamaCppRunner("model.gguf", lora_path=None)         # llama-cpp-python, logits_all=True
                                                         # (kv_f32=True: f32 KV cache)
    OrtRunner("model_dir_with_onnx")                     # reads genai_config.json for names

All three decode greedily with their own KV cache (transformers' DynamicCache in torch), so the
gate checks the runtimes' caches as well as their full-prompt logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Runner(Protocol):
    def logits(self, ids: list[int]) -> np.ndarray: ...
    def greedy(self, ids: list[int], n: int) -> list[int]: ...
    def tokenize(self, text: str) -> list[int] | None: ...


def cache_kwarg(model: Any) -> str:
    """The forward() keyword for the KV cache: `cache` (transformers >= 5.2x) or the older
    `past_key_values` (still accepted, with a deprecation warning, until 5.40)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class TorchRunner:
    """A causal LM in torch: the merged model, or base + adapter before merging."""

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids]), use_cache=False)
        return out.logits[0].float().numpy()

    def greedy(self, ids: list[int], n: int) -> list[int]:
        import torch

        key = cache_kwarg(self.model)
        out: list[int] = []
        step, past = torch.tensor([ids]), None
        with torch.no_grad():
            for _ in range(n):
                res = self.model(input_ids=step, use_cache=True, **{key: past})
                out.append(int(res.logits[0, -1].argmax()))
                step, past = torch.tensor([out[-1:]]), res[key]
        return out

    def tokenize(self, text: str) -> list[int] | None:
        if self.tokenizer is None:
            return None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class LlamaCppRunner:
    """A GGUF (optionally with a GGUF LoRA) loaded by llama-cpp-python."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        lora_path: str | Path | None = None,
        n_ctx: int = 512,
        kv_f32: bool = False,
    ) -> None:
        from llama_cpp import Llama

        kwargs: dict[str, Any] = {"lora_path": str(lora_path)} if lora_path else {}
        if kv_f32:  # llama.cpp's default f16 KV cache alone moves f32 logits by ~1e-2
            kwargs.update(type_k=0, type_v=0)  # GGML_TYPE_F32
        self.llm = Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=2,
            seed=0,
            verbose=False,
            **kwargs,
        )

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(ids)
        out: list[int] = []
        for _ in range(n):
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([out[-1]])
        return out

    def tokenize(self, text: str) -> list[int] | None:
        # like HF's tokenize(add_special_tokens=False): the rendered template already holds BOS
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def close(self) -> None:
        self.llm.close()


class OrtRunner:
    """An exported ONNX decoder run by onnxruntime, past key/values fed back each step."""

    def __init__(self, model_dir: str | Path) -> None:
        import onnxruntime as ort

        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "genai_config.json").read_text())["model"]
        dec = cfg["decoder"]
        self.n_layers = dec["num_hidden_layers"]
        self.kv_shape = (dec["num_key_value_heads"], dec["head_size"])
        self.names = dec["inputs"]
        self.out_names = dec["outputs"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        self.session = ort.InferenceSession(
            str(model_dir / dec["filename"]), opts, providers=["CPUExecutionProvider"]
        )
        self.tokenizer_dir = model_dir

    def _run(self, ids: list[int], past: list[np.ndarray] | None, start: int) -> list[np.ndarray]:
        if past is None:
            empty = np.zeros((1, self.kv_shape[0], 0, self.kv_shape[1]), np.float32)
            past = [empty] * (2 * self.n_layers)
        total = start + len(ids)
        feed = {
            self.names["input_ids"]: np.array([ids], np.int64),
            self.names["attention_mask"]: np.ones((1, total), np.int64),
            self.names["position_ids"]: np.arange(start, total, dtype=np.int64)[None],
        }
        for i in range(self.n_layers):
            feed[self.names["past_key_names"] % i] = past[2 * i]
            feed[self.names["past_value_names"] % i] = past[2 * i + 1]
        names = [self.out_names["logits"]]
        for i in range(self.n_layers):
            names += [self.out_names["present_key_names"] % i]
            names += [self.out_names["present_value_names"] % i]
        return self.session.run(names, feed)  # [logits, present.0.key, present.0.value, ...]

    def logits(self, ids: list[int]) -> np.ndarray:
        return self._run(ids, None, 0)[0][0]

    def greedy(self, ids: list[int], n: int) -> list[int]:
        outs = self._run(ids, None, 0)
        pos, out = len(ids), []
        for _ in range(n):
            out.append(int(outs[0][0, -1].argmax()))
            outs = self._run(out[-1:], outs[1:], pos)
            pos += 1
        return out

    def tokenize(self, text: str) -> list[int] | None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.tokenizer_dir / "tokenizer.json"))
        return tok.encode(text, add_special_tokens=False).ids
