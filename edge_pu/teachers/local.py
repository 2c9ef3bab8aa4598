"""Local model teachers: a transformers model dir (`hf`) or a GGUF file through llama.cpp (`gguf`).

Both decode with the chat template, greedily unless teacher.temperature > 0.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TeacherConfig
from ..errors import EdgePuError
from .base import PromptLike, chat_messages


def _existing(cfg: TeacherConfig, what: str) -> Path:
    path = Path(cfg.path)
    if not cfg.path or not path.exists():
        raise EdgePuError(f"config: teacher.path {cfg.path!r} does not exist; give {what}.")
    return path


class HFTeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _existing(cfg, "a transformers model folder")
        self.cfg = cfg
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                          use_safetensors=True).eval()
        self.identity = f"hf:{path.resolve()}"

    def answer(self, prompt: PromptLike) -> str:
        import torch

        enc = self.tok.apply_chat_template(chat_messages(self.cfg, prompt),
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
        sample = self.cfg.temperature > 0
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.cfg.max_tokens, do_sample=sample,
                                      temperature=self.cfg.temperature if sample else None,
                                      pad_token_id=self.tok.pad_token_id)
        return self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


class GGUFTeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise EdgePuError("teacher.kind: gguf needs llama-cpp-python: "
                              "pip install 'edge-pu[gguf]'.") from None
        path = _existing(cfg, "a .gguf file")
        self.cfg = cfg
        self.llm = Llama(model_path=str(path), n_ctx=2048, verbose=False, seed=0)
        self.identity = f"gguf:{path.resolve()}"

    def answer(self, prompt: PromptLike) -> str:
        out = self.llm.create_chat_completion(messages=chat_messages(self.cfg, prompt),
                                              max_tokens=self.cfg.max_tokens,
                                              temperature=self.cfg.temperature)
        return str(out["choices"][0]["message"]["content"]).strip()
