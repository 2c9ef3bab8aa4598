"""OpenAI-compatible chat-completions teacher (vLLM, llama.cpp server, Ollama, hosted APIs).

Speaks plain HTTP with the standard library, so it needs no SDK. The API key is read from the
environment variable named by `teacher.api_key_env` at call time; it is never logged or stored.
One `answer()` is one HTTP request; retries live in the anchor stage, which counts every request.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request

from ..config import TeacherConfig
from ..errors import EdgePuError
from .base import TeacherError, chat_messages


class OpenAITeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        if not cfg.base_url.startswith(("http://", "https://")):
            raise EdgePuError(f"config: teacher.base_url must start with http:// or https://, "
                              f"got {cfg.base_url!r}.")
        if not cfg.model:
            raise EdgePuError("config: teacher.model is required for teacher.kind: openai.")
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            raise EdgePuError(f"config: teacher.api_key_env names ${cfg.api_key_env}, which is "
                              "not set in the environment; export it or clear api_key_env.")
        self.cfg = cfg
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        # The endpoint is not part of the identity: moving the same model to another host must
        # not re-ask (and re-pay for) every prompt.
        self.identity = f"openai:{cfg.model}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key_env:
            headers["Authorization"] = f"Bearer {os.environ.get(self.cfg.api_key_env, '')}"
        return headers

    def answer(self, prompt: str) -> str:
        body = {"model": self.cfg.model, "messages": chat_messages(self.cfg, prompt),
                "max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature,
                "stream": False}
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                     headers=self._headers(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _http_error(exc) from None
        except (TimeoutError, socket.timeout):
            raise TeacherError(f"timed out after {self.cfg.timeout_s:g}s", retryable=True) from None
        except urllib.error.URLError as exc:
            raise TeacherError(f"cannot reach {self.url}: {exc.reason}", retryable=True) from None
        except (ConnectionError, OSError) as exc:
            raise TeacherError(f"connection to {self.url} failed: {exc}", retryable=True) from None
        return _content(raw)


def _http_error(exc: urllib.error.HTTPError) -> TeacherError:
    detail = exc.read()[:200].decode("utf-8", "replace").strip()
    if exc.code == 429:
        after = exc.headers.get("Retry-After")
        try:
            wait = float(after) if after else None
        except ValueError:
            wait = None
        return TeacherError(f"HTTP 429 rate limited: {detail}", retryable=True, retry_after=wait)
    if exc.code >= 500 or exc.code == 408:
        return TeacherError(f"HTTP {exc.code} server error: {detail}", retryable=True)
    if exc.code in (401, 403, 404):
        return TeacherError(f"HTTP {exc.code} from the teacher ({detail}); check "
                            "teacher.base_url, teacher.model and the API key.", fatal=True)
    return TeacherError(f"HTTP {exc.code}: {detail}")


def _content(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise TeacherError(f"malformed reply: {raw[:120]!r}", retryable=True) from None
    if choice.get("finish_reason") == "content_filter":
        raise TeacherError("the teacher refused (finish_reason: content_filter)")
    if not isinstance(text, str) or not text.strip():
        raise TeacherError("empty answer", retryable=True)
    return text.strip()
