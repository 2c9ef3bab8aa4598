"""Teachers that read answers instead of asking a model.

`file`: a JSONL of anchors carried across an air gap: {"prompt": ..., "anchor": ...} per line
(also accepted: "response" or "answer" for the text, "id" to match by id).
`oracle`: the built-in task suite's correct answers (edge_pu.tasks), used by the demo and the
evaluation as a perfect black-box teacher.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TeacherConfig
from ..errors import EdgePuError
from ..jsonl import iter_jsonl
from .base import TeacherError

_TEXT_FIELDS = ("anchor", "response", "answer")


class FileTeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        if not cfg.path:
            raise EdgePuError("config: teacher.path must name the anchors JSONL for kind: file.")
        path = Path(cfg.path)
        self.answers: dict[str, str] = {}
        for line, rec in iter_jsonl(path, strict=True):
            text = next((rec[f] for f in _TEXT_FIELDS if f in rec), None)
            if not isinstance(rec.get("prompt"), str) or not isinstance(text, str):
                raise EdgePuError(f"{path}:{line}: each line needs \"prompt\" and \"anchor\" "
                                  "strings.")
            self.answers[rec["prompt"]] = text
        self.identity = f"file:{path.name}"

    def answer(self, prompt: str) -> str:
        try:
            return self.answers[prompt]
        except KeyError:
            raise TeacherError("no answer for this prompt in the anchors file") from None


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

    def answer(self, prompt: str) -> str:
        try:
            return self.answers[prompt]
        except KeyError:
            raise TeacherError("the oracle knows only the built-in task prompts") from None
