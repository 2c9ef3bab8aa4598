"""Teachers: black boxes that turn a prompt into one anchor answer (text in, text out).

`make_teacher(cfg)` builds one from `TeacherConfig.kind` through a lazy registry, so choosing the
`openai` teacher never imports torch and the `gguf` one imports llama_cpp only when used.
"""

from __future__ import annotations

import importlib

from ..config import TeacherConfig
from .base import Teacher, TeacherError

REGISTRY: dict[str, str] = {
    "openai": "edge_pu.teachers.openai:OpenAITeacher",
    "hf": "edge_pu.teachers.local:HFTeacher",
    "gguf": "edge_pu.teachers.local:GGUFTeacher",
    "file": "edge_pu.teachers.file:FileTeacher",
    "oracle": "edge_pu.teachers.file:OracleTeacher",
}


def make_teacher(cfg: TeacherConfig) -> Teacher:
    module, _, name = REGISTRY[cfg.kind].partition(":")
    return getattr(importlib.import_module(module), name)(cfg)


__all__ = ["Teacher", "TeacherError", "make_teacher", "REGISTRY"]
