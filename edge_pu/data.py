"""Prompts: what the student is asked, read from the files people have (edge_pu.datafiles:
JSONL, JSON array, CSV, Parquet, a `datasets` save_to_disk folder).

Each record is one of
- a prompt string in `data.prompt_field` (default "prompt"); TRL's conversational form, where
  "prompt" is a list of messages, too;
- an Alpaca record: "instruction", with an optional "input" joined after a blank line;
- a "messages" list of {"role": "system" | "user" | "assistant", "content"} turns (the OpenAI
  and TRL conversational format).
The conversation up to its last user turn is the prompt. A trailing assistant turn, an Alpaca
"output", or an "anchor" / "response" / "answer" / "completion" field is the record's answer:
the `file` teacher (edge_pu.teachers.file) reads the same records for it. `data.system_prompt`
is put first where a record has no system turn.

A `Prompt` carries its turns, and `prompt_ids(backend, prompt)` is the one place a prompt meets
the student's chat template: sampling, ranking, training and evaluation all go through it.
`Prompt.text` is what anchors are keyed on and what the judge is shown: for a single user
turn its text, exactly as the JSONL prompts always were (so existing run dirs resume), else the
conversation written out ("System: ...\n\nUser: ...").

Ids: the record's "id", else its line (JSONL: `line-00042`) or row (`row-00042`). Duplicate
ids, empty prompts and malformed records are refused with the file, line or row and field
named. `check_prompt_lengths(...)` refuses prompts that do not fit the student's context; the
pipeline calls it with token counts from the student's tokenizer before any teacher call is
paid for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .datafiles import Row, read_records
from .errors import EdgePuError

Turn = tuple[str, str]  # (role, content)
ANSWER_FIELDS = ("anchor", "response", "answer", "completion", "output")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_LIKELY_PROMPT = ("question", "query", "text", "input", "content", "problem")


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # the anchor key and the judge's view: see the module docstring
    line: int = field(default=0, compare=False)  # line or row in the file (0: not from a file)
    turns: tuple[Turn, ...] = ()  # the conversation, ending with a user turn; () = one, `text`
    answer: str | None = field(default=None, compare=False)  # the record's own answer, if any
    where: str = field(default="", compare=False)  # how messages name the record
    # The record's other fields (its own columns, e.g. a workload's "constraints"): what
    # reward functions receive as keyword arguments, as TRL passes dataset columns.
    columns: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.turns:
            object.__setattr__(self, "turns", (("user", self.text),))

    @classmethod
    def chat(cls, pid: str, turns: Sequence[Turn], **kw: Any) -> Prompt:
        """A prompt from its conversation (ending with a user turn); `text` derived from it."""
        return cls(pid, prompt_text(turns), turns=tuple(turns), **kw)

    def messages(self, *, last_user: str | None = None) -> list[dict[str, str]]:
        """The conversation as chat messages; `last_user` replaces the last user turn's text."""
        out = [{"role": r, "content": c} for r, c in self.turns]
        if last_user is not None:
            out[-1] = {"role": "user", "content": last_user}
        return out

    @property
    def last_user(self) -> str:
        return self.turns[-1][1]


def prompt_text(turns: Sequence[Turn]) -> str:
    """One user turn: its text. Otherwise the conversation, one "Role: content" per turn."""
    if len(turns) == 1 and turns[0][0] == "user":
        return turns[0][1]
    return "\n\n".join(f"{role.capitalize()}: {content}" for role, content in turns)


def as_turns(prompt: str | Sequence[dict[str, str]]) -> tuple[Turn, ...]:
    """A prompt string (one user turn) or chat messages as turns."""
    if isinstance(prompt, str):
        return (("user", prompt),)
    return tuple((m["role"], m["content"]) for m in prompt)


def prompt_ids(backend: Any, prompt: Prompt | str, *, last_user: str | None = None
               ) -> list[int]:
    """The student's token ids for `prompt` (a plain string is one user turn): its messages
    through the backend's chat template, ending with the assistant turn's opening."""
    if isinstance(prompt, str):
        prompt = Prompt("", prompt)
    return list(backend.chat_ids(prompt.messages(last_user=last_user)))


# ---- reading records ---------------------------------------------------------------------
def load_data(data: Any) -> list[Prompt]:
    """`load_prompts` with the settings of a config's `data:` section (config.DataConfig)."""
    return load_prompts(data.prompts, limit=data.limit, prompt_field=data.prompt_field,
                        system_prompt=data.system_prompt, fmt=data.format)


def load_prompts(path: str | Path, *, limit: int = 0, prompt_field: str = "prompt",
                 system_prompt: str = "", fmt: str = "auto") -> list[Prompt]:
    path = Path(path)
    if not str(path) or str(path) == ".":
        raise EdgePuError("config: data.prompts is not set; give a file of prompts (JSONL, "
                          "JSON, CSV, Parquet) or a datasets save_to_disk folder.")
    if not path.exists():
        raise EdgePuError(f"{path}: data.prompts file not found.")
    prompts: list[Prompt] = []
    seen: dict[str, Prompt] = {}
    for p in iter_prompts(path, prompt_field=prompt_field, system_prompt=system_prompt,
                          fmt=fmt):
        if p.id in seen:
            first = seen[p.id]
            at = f"line {first.line}" if first.where == f"{path}:{first.line}" else first.where
            raise EdgePuError(f"{p.where}: duplicate id {p.id!r} (first on {at}).")
        seen[p.id] = p
        prompts.append(p)
        if limit and len(prompts) >= limit:
            break
    if not prompts:
        raise EdgePuError(f"{path}: no prompts found.")
    return prompts


def iter_prompts(path: str | Path, *, prompt_field: str = "prompt", system_prompt: str = "",
                 fmt: str = "auto", teacher: bool = False) -> Iterator[Prompt]:
    """Every record of the file as a Prompt, checked. `teacher=True` reads a teacher file: each
    record's answer too (Prompt.answer), and no ids (a teacher matches by conversation)."""
    for row in read_records(path, fmt):
        yield parse_record(row, prompt_field=prompt_field, system_prompt=system_prompt,
                           teacher=teacher)


def parse_record(row: Row, *, prompt_field: str = "prompt", system_prompt: str = "",
                 teacher: bool = False) -> Prompt:
    """One record as a Prompt (see the module docstring), or EdgePuError naming its place and
    field. Answer fields are read only for a teacher (`teacher=True`): in a prompts file they
    are the user's own columns, whatever their type."""
    rec, where = row.record, row.where
    answer: str | None = None
    # Which kind of record: the first of these fields that holds a value (a CSV's empty cell
    # and a Parquet null hold none), so one file may mix the kinds.
    if rec.get(prompt_field) is not None:
        value = rec[prompt_field]
        if isinstance(value, list):  # TRL's conversational prompt: a list of messages
            if not all(isinstance(m, dict) for m in value):
                raise EdgePuError(f"{where}: field \"{prompt_field}\" must be a string, got "
                                  "list (a list is read as chat messages only when each item "
                                  "is a {\"role\", \"content\"} object).")
            turns, answer = _conversation(value, where, prompt_field)
        else:
            turns = (("user", _text(value, where, prompt_field)),)
        answer = answer or (_answer_field(rec, where) if teacher else None)
    elif rec.get("messages") is not None:
        turns, answer = _conversation(rec["messages"], where, "messages")
    elif rec.get("instruction") is not None:  # Alpaca
        text = _text(rec["instruction"], where, "instruction")
        extra = rec.get("input")
        if extra is not None and not isinstance(extra, str):
            raise EdgePuError(f"{where}: field \"input\" must be a string, got "
                              f"{type(extra).__name__}.")
        turns = (("user", f"{text}\n\n{extra}" if extra and extra.strip() else text),)
        answer = _answer_field(rec, where) if teacher else None
    elif prompt_field in rec:
        raise EdgePuError(f"{where}: field \"{prompt_field}\" is empty.")
    else:
        found = next((k for k in _LIKELY_PROMPT if rec.get(k) is not None and k != prompt_field),
                     None)
        hint = (f" (found \"{found}\": set data.prompt_field: {found}, or rename it to "
                f"\"{prompt_field}\")") if found else ""
        raise EdgePuError(f"{where}: missing field \"{prompt_field}\"{hint}; a record needs "
                          f"\"{prompt_field}\" (data.prompt_field), \"messages\" or "
                          "\"instruction\".")
    if system_prompt and turns[0][0] != "system":
        turns = (("system", system_prompt), *turns)
    pid = None if teacher else rec.get("id")
    if pid is None:
        pid = f"{'line' if row.unit == 'line' else 'row'}-{row.n:05d}"
    elif not isinstance(pid, (str, int)) or isinstance(pid, bool) or pid == "":
        raise EdgePuError(f"{where}: field \"id\" must be a non-empty string or an integer, got "
                          f"{pid!r}.")
    used = {prompt_field, "messages", "instruction", "input", "id"}
    columns = {} if teacher else {k: v for k, v in rec.items() if k not in used}
    return Prompt.chat(str(pid), turns, line=row.n, answer=answer if teacher else None,
                       where=where, columns=columns)


def _text(value: Any, where: str, name: str) -> str:
    if value is None:
        raise EdgePuError(f"{where}: field \"{name}\" is empty.")
    if not isinstance(value, str):
        raise EdgePuError(f"{where}: field \"{name}\" must be a string, got "
                          f"{type(value).__name__}.")
    if not value.strip():
        raise EdgePuError(f"{where}: field \"{name}\" is empty.")
    return value


def _content(msg: Any, where: str, name: str) -> tuple[str, str]:
    if not isinstance(msg, dict):
        raise EdgePuError(f"{where}: field \"{name}\" must be a string or a list of "
                          f"{{\"role\", \"content\"}} messages; got a {type(msg).__name__} in "
                          "the list.")
    role = msg.get("role")
    if role not in _ROLES:
        raise EdgePuError(f"{where}: field \"{name}\".role is {role!r}; it must be system, user "
                          "or assistant.")
    content = msg.get("content")
    if isinstance(content, list):  # OpenAI content parts: text only
        if not all(isinstance(c, dict) and c.get("type") == "text"
                   and isinstance(c.get("text"), str) for c in content):
            raise EdgePuError(f"{where}: field \"{name}\".content has a part that is not "
                              "{\"type\": \"text\", \"text\": ...}; only text is read.")
        content = "\n".join(c["text"] for c in content)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise EdgePuError(f"{where}: field \"{name}\".content must be a string, got "
                          f"{type(content).__name__}.")
    return _ROLES[role], content


def _conversation(value: Any, where: str, name: str) -> tuple[tuple[Turn, ...], str | None]:
    """The turns up to the last user turn, and the assistant turn after it (the answer)."""
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else f"a {type(value).__name__}"
        csv = " (a CSV cell holds the list as JSON)" if isinstance(value, str) else ""
        raise EdgePuError(f"{where}: field \"{name}\" must be a non-empty list of {{\"role\", "
                          f"\"content\"}} messages, got {what}{csv}.")
    turns = []
    for i, msg in enumerate(value):
        role, content = _content(msg, where, f"{name}[{i}]")
        if role == "system" and i:
            raise EdgePuError(f"{where}: field \"{name}[{i}]\" is a system turn; a system turn "
                              "may only come first.")
        turns.append((role, content))
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not users:
        raise EdgePuError(f"{where}: field \"{name}\" has no user turn; the prompt is the "
                          "conversation up to its last user turn.")
    last = users[-1]
    if not turns[last][1].strip():
        raise EdgePuError(f"{where}: field \"{name}[{last}]\".content is empty (the last user "
                          "turn is the prompt).")
    tail = turns[last + 1:]
    if len(tail) > 1:
        raise EdgePuError(f"{where}: field \"{name}\" has {len(tail)} assistant turns after the "
                          "last user turn; at most one (the answer) may follow it.")
    answer = tail[0][1] if tail and tail[0][1].strip() else None
    return tuple(turns[: last + 1]), answer


def _answer_field(rec: dict[str, Any], where: str) -> str | None:
    name = next((f for f in ANSWER_FIELDS if rec.get(f) is not None), None)
    if name is None:
        return None
    value = rec[name]
    if isinstance(value, list):  # TRL's conversational completion: [{"role": "assistant", ...}]
        parts = [_content(m, where, f"{name}[{i}]") for i, m in enumerate(value)]
        if any(role != "assistant" for role, _ in parts):
            raise EdgePuError(f"{where}: field \"{name}\" must hold assistant turns only.")
        value = "\n".join(c for _, c in parts)
    if not isinstance(value, str):
        raise EdgePuError(f"{where}: field \"{name}\" must be a string, got "
                          f"{type(value).__name__}.")
    return value if value.strip() else None


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
    where = [p.where or (f"{source}:{p.line}" if source and p.line else str(source or "prompt"))
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
