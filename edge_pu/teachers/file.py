"""Teachers that read answers instead of asking a model.

`file` (teacher.path): answers carried across an air gap, in any format and record kind that
prompts come in (edge_pu.data): {"prompt", "anchor"} records as `edge-pu anchors --export`
writes them ("response", "answer", "completion" or "output" are read too), Alpaca
"instruction" / "input" / "output" records, or chat transcripts whose "messages" end with the
assistant's answer. A prompt is matched by its conversation (Prompt.text); a prompt that got a
system turn the file's record has not (data.system_prompt) falls back to the record of the same
conversation without it.
`oracle`: the built-in task suite's correct answers (edge_pu.tasks), used by the demo and the
evaluation as a perfect black-box teacher.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TeacherConfig
from ..data import ANSWER_FIELDS, as_turns, iter_prompts, prompt_text
from ..errors import EdgePuError
from ..jsonl import iter_jsonl
from .base import PromptLike, TeacherError


class FileTeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        if not cfg.path:
            raise EdgePuError("config: teacher.path must name the answers file for kind: file.")
        path = Path(cfg.path)
        if not path.exists():
            raise EdgePuError(f"{path}: teacher.path file not found.")
        self.answers: dict[str, str] = {}
        others = ", ".join(f'"{f}"' for f in ANSWER_FIELDS[1:])
        for p in iter_prompts(path, teacher=True):
            if p.answer is None:
                raise EdgePuError(
                    f"{p.where}: no answer in this record; a teacher file needs \"prompt\" and "
                    f"\"anchor\" (or {others}), an "
                    "Alpaca \"instruction\" with its \"output\", or \"messages\" ending with "
                    "the assistant's turn.")
            self.answers[p.text] = p.answer
        self.identity = f"file:{path.name}"

    def answer(self, prompt: PromptLike) -> str:
        turns = as_turns(prompt)
        text = self.answers.get(prompt_text(turns))
        if text is None and len(turns) > 1 and turns[0][0] == "system":
            text = self.answers.get(prompt_text(turns[1:]))
        if text is None:
            raise TeacherError("no answer for this prompt in the anchors file")
        return text


class OracleTeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        from ..tasks import from_jsonl_row, generate_tasks

        # teacher.path: a tasks JSONL (edge_pu.tasks rows); else the built-in default suite.
        if cfg.path:
            tasks = [from_jsonl_row(rec) for _, rec in iter_jsonl(cfg.path, strict=True)]
        else:
            tasks = generate_tasks(900, seed=0)
        self.answers = {t.prompt: t.answer for t in tasks}
        self.identity = "oracle:edge_pu.tasks"

    def answer(self, prompt: PromptLike) -> str:
        try:
            return self.answers[prompt_text(as_turns(prompt))]
        except KeyError:
            raise TeacherError("the oracle knows only the built-in task prompts") from None
