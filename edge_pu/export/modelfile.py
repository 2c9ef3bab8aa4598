"""Ollama Modelfile for an exported GGUF, and the chat template check.

    from edge_pu.export import write_modelfile, check_chat_template
    write_modelfile("export/model-q8_0.gguf")          # -> export/Modelfile
    check = check_chat_template("export/model-q8_0.gguf", hf_tokenizer)
    # {"value": 1.0, "threshold": 1.0, "op": ">=", "pass": True}

`check_chat_template` renders the template stored in the GGUF (tokenizer.chat_template) with
jinja2, as llama.cpp-based chat front ends do, and compares it with the HF tokenizer's
`apply_chat_template` on fixed conversations: value = fraction rendered identically.

`write_modelfile` reads everything from the GGUF itself: FROM the file, PARAMETER stop for the
EOS token (and <|im_start|>/<|im_end|> for ChatML). When the stored template renders every test
conversation exactly as ChatML does (optionally with a default system prompt, as SmolLM2's
does), it writes the equivalent Ollama Go TEMPLATE (and SYSTEM); otherwise it writes no
TEMPLATE and Ollama falls back to the template embedded in the GGUF.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from edge_pu.gguf_header import read_header

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Capital of France?"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a fruit."},
    ],
]

OLLAMA_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if ne .Role "system" }}<|im_start|>{{ .Role }}
{{ .Content }}{{ if or (ne .Role "assistant") (not $last) }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Chat template and special tokens stored in a GGUF."""
    fields = read_header(path, arrays={"tokenizer.ggml.tokens"}).fields
    tokens = fields["tokenizer.ggml.tokens"].values

    def token(key: str) -> str | None:
        index = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[index] if index is not None else None

    return {
        "chat_template": fields.get("tokenizer.chat_template"),
        "bos_token": token("bos"),
        "eos_token": token("eos"),
    }


def render_template(template: str, messages: list[dict], **special: Any) -> str:
    """Render a HF-style chat template with jinja2 the way transformers does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, **special
    )


def check_chat_template(gguf_path: str | Path, tokenizer: Any) -> dict[str, Any]:
    """Does the GGUF's stored template render CONVERSATIONS exactly as the HF tokenizer does?"""
    meta = gguf_metadata(gguf_path)
    same = 0
    for messages in CONVERSATIONS:
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if meta["chat_template"] is not None:
            got = render_template(
                meta["chat_template"],
                messages,
                bos_token=meta["bos_token"] or "",
                eos_token=meta["eos_token"] or "",
            )
            same += got == want
    value = same / len(CONVERSATIONS)
    return {"value": value, "threshold": 1.0, "op": ">=", "pass": value >= 1.0}


def chatml(messages: list[dict[str, str]], default_system: str | None) -> str:
    """What OLLAMA_CHATML renders (with SYSTEM = default_system), in Python, for comparison."""
    system = next((m["content"] for m in messages if m["role"] == "system"), default_system)
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for m in messages:
        if m["role"] != "system":
            text += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def chatml_system(template: str | None) -> tuple[bool, str | None]:
    """(is the template ChatML on every test conversation, its default system prompt)."""
    if not template:
        return False, None
    first = render_template(template, CONVERSATIONS[0])
    default = None
    head = "<|im_start|>system\n"
    if first.startswith(head) and "<|im_end|>\n" in first:
        default = first[len(head) : first.index("<|im_end|>\n")]
    ok = all(render_template(template, c) == chatml(c, default) for c in CONVERSATIONS)
    return ok, default if ok else None


def write_modelfile(gguf_path: str | Path, out_path: str | Path | None = None) -> Path:
    """Write an Ollama Modelfile next to `gguf_path` (or at `out_path`); returns its path."""
    gguf_path = Path(gguf_path)
    out_path = Path(out_path) if out_path else gguf_path.parent / "Modelfile"
    meta = gguf_metadata(gguf_path)
    is_chatml, system = chatml_system(meta["chat_template"])
    lines = [f"FROM ./{gguf_path.name}"]
    stops = [meta["eos_token"]] if meta["eos_token"] else []
    if is_chatml:
        lines.append(f'TEMPLATE """{OLLAMA_CHATML}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops += ["<|im_start|>", "<|im_end|>"]
    else:
        lines.append("# chat template is not ChatML: Ollama uses the one stored in the GGUF")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    out_path.write_text("\n".join(lines) + "\n")
    return out_path
