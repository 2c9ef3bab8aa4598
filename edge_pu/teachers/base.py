"""The teacher interface and its error type.

A teacher is asked with a prompt string (one user turn) or a conversation as chat messages
(edge_pu.data.Prompt.messages(): system / user / assistant turns ending with a user turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..config import TeacherConfig


class TeacherError(Exception):
    """A teacher failed on one prompt.

    `retryable`: worth asking again after a backoff (timeout, 429, 5xx, garbled reply).
    `fatal`: no prompt can succeed (bad key, unknown model, endpoint missing): stop the stage.
    `retry_after`: seconds the server asked us to wait (429 Retry-After), if any.
    """

    def __init__(self, message: str, *, retryable: bool = False, fatal: bool = False,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.fatal = fatal
        self.retry_after = retry_after


Messages = Sequence[dict[str, str]]
PromptLike = str | Messages


class Teacher(Protocol):
    identity: str  # what anchors are keyed on; never contains a secret

    def answer(self, prompt: PromptLike) -> str:
        """One request to the teacher. Raises TeacherError; retries are the caller's job."""
        ...


def generation_settings(cfg: TeacherConfig) -> dict[str, object]:
    """The settings that change what the teacher says: part of every anchor's key."""
    return {"system_prompt": cfg.system_prompt, "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature}


def chat_messages(cfg: TeacherConfig, prompt: PromptLike) -> list[dict[str, str]]:
    """The messages sent to the teacher. `teacher.system_prompt` (the teacher's instructions)
    comes first; where the conversation has its own system turn (the one the student is trained
    under), the two are one system message, the teacher's first, a blank line between."""
    msgs = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
            else [dict(m) for m in prompt])
    if not cfg.system_prompt:
        return msgs
    if msgs and msgs[0]["role"] == "system":
        return [{"role": "system", "content": f"{cfg.system_prompt}\n\n{msgs[0]['content']}"},
                *msgs[1:]]
    return [{"role": "system", "content": cfg.system_prompt}, *msgs]
