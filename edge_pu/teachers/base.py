"""The teacher interface and its error type."""

from __future__ import annotations

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


class Teacher(Protocol):
    identity: str  # what anchors are keyed on; never contains a secret

    def answer(self, prompt: str) -> str:
        """One request to the teacher. Raises TeacherError; retries are the caller's job."""
        ...


def generation_settings(cfg: TeacherConfig) -> dict[str, object]:
    """The settings that change what the teacher says: part of every anchor's key."""
    return {"system_prompt": cfg.system_prompt, "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature}


def chat_messages(cfg: TeacherConfig, prompt: str) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return msgs + [{"role": "user", "content": prompt}]
