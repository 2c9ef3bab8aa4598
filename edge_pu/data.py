"""Prompts file: JSONL, one object per line with "prompt" (string) and optional "id".

`load_prompts(path)` validates every line and returns `Prompt`s; ids default to the line's
number (`line-00042`), duplicates and empty prompts are refused with file and line named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import EdgePuError
from .jsonl import iter_jsonl


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str


def load_prompts(path: str | Path, *, limit: int = 0) -> list[Prompt]:
    path = Path(path)
    if not str(path) or str(path) == ".":
        raise EdgePuError("config: data.prompts is not set; give a JSONL file of prompts.")
    if path.is_dir():
        raise EdgePuError(f"{path}: data.prompts is a folder; give a JSONL file.")
    prompts: list[Prompt] = []
    seen: dict[str, int] = {}
    for line, rec in iter_jsonl(path, strict=True):
        text = rec.get("prompt")
        if text is None:
            raise EdgePuError(f"{path}:{line}: missing field \"prompt\".")
        if not isinstance(text, str):
            raise EdgePuError(f"{path}:{line}: field \"prompt\" must be a string, "
                              f"got {type(text).__name__}.")
        if not text.strip():
            raise EdgePuError(f"{path}:{line}: field \"prompt\" is empty.")
        pid = rec.get("id", f"line-{line:05d}")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise EdgePuError(f"{path}:{line}: field \"id\" must be a string or integer.")
        pid = str(pid)
        if pid in seen:
            raise EdgePuError(f"{path}:{line}: duplicate id {pid!r} (first on line {seen[pid]}).")
        seen[pid] = line
        prompts.append(Prompt(pid, text))
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise EdgePuError(f"{path}: no prompts found.")
    return prompts
