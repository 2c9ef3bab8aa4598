"""Tokenizer and chat template of an HF model dir -> GGUF `tokenizer.*` metadata (gpt2-style BPE).

    vocab = read_vocab(model_dir, vocab_size)   # VocabMeta, or ExportError naming the field
    add_vocab(writer, vocab)                    # adds tokenizer.ggml.* and tokenizer.chat_template

Reads the tokenizer as transformers loads it (AutoTokenizer: byte-level BPE vocab, merges,
added tokens, special tokens, whether it adds BOS, the chat template).
The pre-tokenizer is matched against the ones llama.cpp implements (`tokenizer.ggml.pre`); an
unknown one is refused, since llama.cpp would split text differently from the trained model.
The export gate also compares llama.cpp's token ids with the HF tokenizer's on its prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_pu.export.errors import ExportError

# llama.cpp's pre-tokenizer names for the splitting regexes it implements.
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_RE = _QWEN2_RE.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
_SPLIT_PRE = {_QWEN2_RE: "qwen2", _LLAMA3_RE: "llama-bpe"}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


@dataclass
class VocabMeta:
    """What GGUF needs from the tokenizer; lists are indexed by token id."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/pad/unk -> id
    add_bos: bool = False
    chat_template: str | None = None


def _byte_level(node: dict[str, Any] | None, *, use_regex: bool) -> bool:
    return (
        node is not None
        and node.get("type") == "ByteLevel"
        and not node.get("add_prefix_space", False)
        and bool(node.get("use_regex", True)) == use_regex
    )


def detect_pre(pre: dict[str, Any] | None, path: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a tokenizer.json `pre_tokenizer` node."""
    if _byte_level(pre, use_regex=True):
        return "gpt-2"
    steps = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        first, second = steps
        if (
            first.get("type") == "Digits"
            and first.get("individual_digits")
            and _byte_level(second, use_regex=True)
        ):
            return "smollm"
        if first.get("type") == "Split" and _byte_level(second, use_regex=False):
            name = _SPLIT_PRE.get((first.get("pattern") or {}).get("Regex", ""))
            if name:
                return name
    raise ExportError(
        f"{path}: pre_tokenizer {json.dumps(pre)[:300]} is not one llama.cpp implements "
        "(known: ByteLevel (gpt-2), Digits+ByteLevel (smollm), the Qwen2 and Llama-3 split "
        "regexes); exporting it would tokenize differently from the trained model."
    )


def load_tokenizer(model_dir: str | Path) -> Any:
    """The HF tokenizer exactly as training loads it (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def read_vocab(model_dir: str | Path, vocab_size: int, tokenizer: Any = None) -> VocabMeta:
    """The byte-level BPE tokenizer of `model_dir`, padded to the model's `vocab_size`.

    Read from the *loaded* tokenizer, not tokenizer.json on disk: transformers 5 may rebuild
    the pipeline for the model type (Qwen2Tokenizer swaps in Qwen2's digit-splitting regex
    and NFC whatever tokenizer.json says), and llama.cpp must split text as training did.
    """
    where = Path(model_dir) / "tokenizer.json"
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError(f"{model_dir}: no fast tokenizer (tokenizer.json); GGUF needs one.")
    tok = json.loads(backend.to_str())
    model = tok.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(
            f"{where}: model.type={model.get('type')!r} (byte_fallback="
            f"{model.get('byte_fallback')}); only byte-level BPE tokenizers (gpt2-style, as in "
            "Llama-3, Qwen2, SmolLM2) are exported."
        )
    if (tok.get("normalizer") or {}).get("type") not in (None, "NFC"):
        raise ExportError(f"{where}: normalizer {tok['normalizer']} is not supported.")
    pre = detect_pre(tok.get("pre_tokenizer"), where)

    id_to_token: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: TOKEN_NORMAL for i in id_to_token}
    for added in tok.get("added_tokens", []):
        id_to_token[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    if max(id_to_token) >= vocab_size:
        raise ExportError(
            f"{where}: token id {max(id_to_token)} >= config vocab_size {vocab_size}; the "
            "embedding matrix is smaller than the tokenizer (resize it before exporting)."
        )
    special_ids = {}
    for key in ("bos", "eos", "pad", "unk"):
        text = getattr(tokenizer, f"{key}_token", None)
        if text is not None:
            special_ids[key] = int(tokenizer.convert_tokens_to_ids(text))
    if "eos" not in special_ids:
        raise ExportError(f"{where}: no eos_token; llama.cpp would never stop generating.")
    # Does HF put a BOS in front when asked for special tokens? Then llama.cpp should too.
    with_special = tokenizer("a")["input_ids"]
    add_bos = "bos" in special_ids and with_special[:1] == [special_ids["bos"]]
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: llama.cpp reads the default one
        template = template.get("default")
    return VocabMeta(
        tokens=[id_to_token.get(i, f"[PAD{i}]") for i in range(vocab_size)],
        types=[types.get(i, TOKEN_UNUSED) for i in range(vocab_size)],
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        pre=pre,
        special_ids=special_ids,
        add_bos=add_bos,
        chat_template=template,
    )


def add_vocab(writer: Any, vocab: VocabMeta) -> None:
    """Write the tokenizer metadata into a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "pad": writer.add_pad_token_id,
        "unk": writer.add_unk_token_id,
    }
    for key, token_id in vocab.special_ids.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
