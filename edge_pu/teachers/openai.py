"""OpenAI-compatible chat-completions teacher (vLLM, llama.cpp server, Ollama, hosted APIs).

Speaks plain HTTP with the standard library, so it needs no SDK. One `answer()` is one HTTP
request; retries, backoff and budgets live in the anchor stage (edge_pu.anchors), which counts
every request.

The API key comes from the environment variable named by `teacher.api_key_env` or from the file
named by `teacher.api_key_file` (a mounted secret), read at call time. It is never stored on the
object, logged or written: any text coming back from the server (error bodies, answers) has the
key replaced by `[redacted]` before edge_pu prints or records it. Redirects are not followed
(urllib would forward the Authorization header to wherever the server points). A loopback
server (127.0.0.1, localhost, ::1) is reached directly, never through `http_proxy`: a proxy
would see the prompts and the key, and could not reach this machine's loopback anyway.

How each fault is classified (TeacherError flags; edge_pu.anchors acts on them):
- timeout, connection refused or dropped, 408/409/425/5xx, truncated or malformed body,
  empty content: retryable.
- 429: retryable, with the server's Retry-After (seconds or an HTTP date) if given; 429
  `insufficient_quota` is fatal (no retry will pay for it).
- 401/403/404, a redirect: fatal (no prompt can succeed: stop the stage).
- other 4xx (prompt too long, bad request): this prompt failed, not retried.
- finish_reason `content_filter` or a `refusal`: this prompt failed, not retried (the same
  prompt would be refused again, and each try is paid for).
- finish_reason `length` with content: ACCEPTED. The call is paid and a retry at the same
  settings returns the same cut-off text; `last_finish_reason` lets the anchor stage flag the
  anchor as truncated and count it. With no content at all (a reasoning model that spent the
  budget thinking) it fails, not retried, with advice to raise teacher.max_tokens.

After each `answer()`, `last_usage` holds the server's `usage` object ({"total_tokens": ...}),
`{"total_tokens": 0}` where the server certainly generated nothing (it refused the request, or
the request never reached it), or None where that is unknown (timeout, dropped connection, no
usage reported); the anchor stage counts unknowns at their worst case against
`teacher.token_budget`.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ..config import TeacherConfig
from ..errors import EdgePuError
from ..keys import read_key
from ..serve import is_loopback
from .base import PromptLike, TeacherError, chat_messages

MAX_REPLY_BYTES = 16 * 2**20  # a chat completion is kilobytes; more is a broken server
_NOTHING_GENERATED: dict[str, Any] = {"total_tokens": 0}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx code


class OpenAITeacher:
    def __init__(self, cfg: TeacherConfig) -> None:
        if not cfg.base_url.startswith(("http://", "https://")):
            raise EdgePuError(f"config: teacher.base_url must start with http:// or https://, "
                              f"got {cfg.base_url!r}.")
        if not cfg.model:
            raise EdgePuError("config: teacher.model is required for teacher.kind: openai.")
        self.cfg = cfg
        api_key(cfg)  # fail now, before any prompt, if the key is configured but missing
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        handlers: list[Any] = [_NoRedirect]
        if is_loopback(urllib.parse.urlsplit(self.url).hostname or ""):
            handlers.append(urllib.request.ProxyHandler({}))  # no proxy, whatever the env says
        self._opener = urllib.request.build_opener(*handlers)
        # The endpoint is not part of the identity: moving the same model to another host must
        # not re-ask (and re-pay for) every prompt.
        self.identity = f"openai:{cfg.model}"
        self.last_usage: dict[str, Any] | None = None
        self.last_finish_reason: str | None = None

    def _scrub(self, text: str) -> str:
        key = api_key(self.cfg)
        return text.replace(key, "[redacted]") if key else text

    def answer(self, prompt: PromptLike) -> str:
        self.last_usage, self.last_finish_reason = None, None
        body = {"model": self.cfg.model, "messages": chat_messages(self.cfg, prompt),
                "max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature,
                "stream": False}
        headers = {"Content-Type": "application/json"}
        key = api_key(self.cfg)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        timeout = self.cfg.timeout_s
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                # The socket timeout bounds each read; this bounds a reply that trickles in.
                raw = _read_capped(resp, time.monotonic() + 2 * timeout)
        except urllib.error.HTTPError as exc:
            err = _http_error(exc, self._scrub)
            if exc.code < 500:  # the server refused the request up front: nothing generated
                self.last_usage = dict(_NOTHING_GENERATED)
            raise err from None
        except TimeoutError:
            raise TeacherError(f"timed out after {timeout:g}s (teacher.timeout_s)",
                               retryable=True) from None
        except urllib.error.URLError as exc:  # raised before the request was fully sent
            self.last_usage = dict(_NOTHING_GENERATED)
            raise TeacherError(f"cannot reach {self.url}: {exc.reason}", retryable=True) from None
        except (http.client.HTTPException, OSError) as exc:
            raise TeacherError(f"connection to {self.url} failed mid-reply "
                               f"({type(exc).__name__}: {exc})", retryable=True) from None
        return self._scrub(self._content(raw))

    def _content(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
        except ValueError:
            raise TeacherError(f"malformed reply, not JSON: {self._scrub(_preview(raw))}",
                               retryable=True) from None
        if isinstance(data, dict) and isinstance(data.get("usage"), dict):
            self.last_usage = data["usage"]
        try:
            choice = data["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            err = data.get("error") if isinstance(data, dict) else None
            detail = f"error: {err}" if err else _preview(raw)
            raise TeacherError(f"malformed reply, no choices[0].message: {self._scrub(detail)}",
                               retryable=True) from None
        finish = choice.get("finish_reason") if isinstance(choice, dict) else None
        self.last_finish_reason = finish if isinstance(finish, str) else None
        text = message.get("content") if isinstance(message, dict) else None
        refusal = message.get("refusal") if isinstance(message, dict) else None
        if finish == "content_filter" or refusal:
            why = f": {self._scrub(str(refusal))[:200]}" if refusal else ""
            raise TeacherError(f"the teacher refused this prompt (finish_reason: {finish}){why}")
        if not isinstance(text, str) or not text.strip():
            if finish == "length":
                raise TeacherError("empty answer: the teacher hit teacher.max_tokens = "
                                   f"{self.cfg.max_tokens} before writing any content; raise it")
            raise TeacherError("empty answer", retryable=True)
        return text.strip()


def api_key(cfg: TeacherConfig) -> str:
    """The API key from $teacher.api_key_env or teacher.api_key_file; "" when neither is set."""
    return read_key(cfg.api_key_env, cfg.api_key_file, env_name="config: teacher.api_key_env",
                    file_name="config: teacher.api_key_file",
                    env_fix="export it or clear api_key_env")


def _read_capped(resp: Any, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := resp.read(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise TeacherError(f"reply larger than {MAX_REPLY_BYTES >> 20} MiB; not a chat "
                               "completion", retryable=True)
        if time.monotonic() > deadline:
            raise TeacherError("reply still arriving after twice teacher.timeout_s",
                               retryable=True)
    return b"".join(chunks)


def _preview(raw: bytes) -> str:
    return repr(raw[:120].decode("utf-8", "replace"))


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date (RFC 9110)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _http_error(exc: urllib.error.HTTPError, scrub: Any) -> TeacherError:
    try:
        detail = scrub(exc.read()[:300].decode("utf-8", "replace").strip())
    except (OSError, http.client.HTTPException):
        detail = ""
    code = exc.code
    if 300 <= code < 400:
        return TeacherError(f"HTTP {code}: the teacher redirects to {exc.headers.get('Location')!r}"
                            "; edge_pu does not follow redirects (the API key would go along). "
                            "Set teacher.base_url to the final address.", fatal=True)
    if code == 429 and "insufficient_quota" in detail:
        return TeacherError(f"HTTP 429 insufficient quota ({detail}); the teacher account "
                            "needs credit.", fatal=True)
    if code == 429 or code >= 500 or code in (408, 409, 425):
        return TeacherError(f"HTTP {code}: {detail}", retryable=True,
                            retry_after=_retry_after(exc.headers.get("Retry-After")))
    if code in (401, 403):
        return TeacherError(f"HTTP {code} from the teacher ({detail}); the API key was refused:"
                            " check the key in teacher.api_key_env / teacher.api_key_file.",
                            fatal=True)
    if code == 404:
        return TeacherError(f"HTTP 404 from the teacher ({detail}); check teacher.base_url "
                            "(it should end in /v1) and teacher.model.", fatal=True)
    return TeacherError(f"HTTP {code}: {detail}")
