"""Tiny models of real architectures, built offline in process, for the tests.

`tiny_tokenizer()` trains a byte-level BPE tokenizer (the kind Llama-3, Qwen2 and SmolLM2 use) on
a few hundred lines of text with the `tokenizers` library and gives it a ChatML chat template and
special tokens, like SmolLM2-Instruct's. `save_tiny_model(path, arch)` writes an HF model dir
(safetensors, config, tokenizer) with random weights of a small config of that architecture.
Nothing here touches a model hub.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_WORDS = (
    "the a an answer question number word list sentence capital city apple banana cherry red "
    "green blue one two three four five six seven eight nine ten plus minus is are what which "
    "write reply only with exactly words json key value name sort ascending yes no good bad "
    "system user assistant reference candidate rate this from to of in and or not"
).split()


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.5:
            words.append(str(rng.randint(0, 999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":", ""]))
    lines.append('{"name": "x", "value": 1} - * 0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ')
    return lines


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512):
    """A PreTrainedTokenizerFast with ChatML template, eos=<|im_end|>, pad=<|endoftext|>."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A small config of a real architecture: 2 layers, hidden 64, GQA 4 heads / 2 KV heads."""
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        # The default 0.02 init leaves logits flat and greedy decoding stuck on one token; 0.2
        # gives peaked, seed-dependent outputs, so rankings and greedy parity tests mean something.
        initializer_range=0.2,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=True, rms_norm_eps=1e-5, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, rms_norm_eps=1e-6, **common)
    raise ValueError(f"tiny_config: unknown arch {arch!r}; use 'llama' or 'qwen2'")


def save_tiny_model(path: str | Path, arch: str = "llama", *, seed: int = 0, **overrides) -> Path:
    """Write an HF model dir with random weights (seeded) and the tiny tokenizer; returns path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    path = Path(path)
    tok = tiny_tokenizer()
    cfg = tiny_config(arch, len(tok), **overrides)
    cfg.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    cfg.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def random_lora_pair(student: dict, root: Path):
    """(torch CPU backend on `student` (a config's student section) with a rank-4 LoRA whose B
    is drawn N(0, 0.2) so the adapter changes the outputs, saved in root/adapter; a llama.cpp
    sampler on the same student, its work dir root/sampler, the adapter not yet applied)."""
    import torch

    from edge_pu.backends import make_backend
    from edge_pu.backends.llamacpp_sampler import LlamaCppSampler
    from edge_pu.config import load_config

    cfg = load_config(None, base={"student": student, "backend": "cpu",
                                  "lora": {"r": 4, "alpha": 8}})
    backend = make_backend("cpu")
    backend.load(cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in backend.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    backend.save_adapter(root / "adapter")
    sampler = LlamaCppSampler(cfg, backend.student_dir, root / "sampler", backend.eos_ids,
                              backend.decode)
    return backend, sampler
