"""Prompts file: JSONL, one object per line with "prompt" (string) and optional "id".

`load_prompts(path)` validates every line and returns `Prompt`s; ids default to the line's
number (`line-00042`), duplicates and empty prompts are refused with file and line named.
`check_prompt_lengths(...)` refuses prompts that do not fit the student's context; the pipeline
calls it with token counts from the student's tokenizer before any teacher call is paid for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgePuError
from .jsonl import iter_jsonl


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    line: int = field(default=0, compare=False)  # line in the prompts file (0: not from a file)


def load_prompts(path: str | Path, *, limit: int = 0) -> list[Prompt]:
    path = Path(path)
    if not str(path) or str(path) == ".":
        raise EdgePuError("config: data.prompts is not set; give a JSONL file of prompts.")
    if path.is_dir():
        raise EdgePuError(f"{path}: data.prompts is a folder; give a JSONL file.")
    if not path.exists():
        raise EdgePuError(f"{path}: data.prompts file not found.")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for line, rec in iter_jsonl(path, strict=True):
        text = rec.get("prompt")
        if text is None:
            hint = next((f" (found \"{k}\"; rename it to \"prompt\")" for k in
                         ("instruction", "question", "input", "text", "messages") if k in rec), "")
            raise EdgePuError(f"{path}:{line}: missing field \"prompt\"{hint}.")
        if not isinstance(text, str):
            raise EdgePuError(f"{path}:{line}: field \"prompt\" must be a string, "
                              f"got {type(text).__name__}.")
        if not text.strip():
            raise EdgePuError(f"{path}:{line}: field \"prompt\" is empty.")
        pid = rec.get("id", f"line-{line:05d}")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool) or pid == "":
            raise EdgePuError(f"{path}:{line}: field \"id\" must be a non-empty string or an "
                              f"integer, got {pid!r}.")
        pid = str(pid)
        if pid in seen:
            raise EdgePuError(f"{path}:{line}: duplicate id {pid!r} (first on line {seen[pid]}).")
        seen[pid] = line
        prompts.append(Prompt(pid, text, line))
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise EdgePuError(f"{path}: no prompts found.")
    return prompts


def check_prompt_lengths(prompts: Sequence[Prompt], token_counts: Sequence[int], *,
                         max_length: int, max_new_tokens: int, source: str | Path = "",
                         model_limit: int = 0) -> None:
    """Refuse prompts whose chat-templated length plus sampling.max_new_tokens exceeds
    student.max_length (and `model_limit`, the model's max_position_embeddings, if given).

    `token_counts[i]` is prompt i's length in tokens as the student sees it (chat template
    included). The message names the file, line and id of the first offenders.
    """
    limit = min(max_length, model_limit) if model_limit else max_length
    room = limit - max_new_tokens
    if room <= 0:
        raise EdgePuError(f"config: sampling.max_new_tokens = {max_new_tokens} leaves no room for "
                          f"a prompt in student.max_length = {limit}; raise student.max_length.")
    bad = [(p, n) for p, n in zip(prompts, token_counts, strict=True) if n > room]
    if not bad:
        return
    where = [f"{source}:{p.line}" if source and p.line else str(source or "prompt")
             for p, _ in bad[:3]]
    shown = "; ".join(f"{w}: id {p.id!r} is {n} tokens" for w, (p, n) in zip(where, bad[:3],
                                                                             strict=True))
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    cap = f"student.max_length = {max_length}" + (
        f" (the model allows {model_limit})" if model_limit and model_limit < max_length else "")
    raise EdgePuError(f"{len(bad)} prompt(s) do not fit the student's context: {shown}{more}. "
                      f"A prompt may use at most {room} tokens ({cap} minus "
                      f"sampling.max_new_tokens = {max_new_tokens}). Shorten or remove them, "
                      "or raise student.max_length.")
