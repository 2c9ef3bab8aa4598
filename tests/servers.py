"""A real OpenAI-compatible chat-completions server on loopback that misbehaves on cue.

`FaultServer(script)` serves POST /v1/chat/completions on 127.0.0.1 (a free port) from a thread.
`script` maps a prompt (the last message's content) to a list of cues consumed one per request;
when a prompt's list runs out, or for prompts not in it, the cue is `default` ("ok"). Cues:

  ok              200, content "anchor: <prompt>", finish_reason "stop", usage
  length          200, content cut short, finish_reason "length"
  length-empty    200, content "", finish_reason "length" (a reasoning model out of tokens)
  empty           200, content ""
  filter          200, content null, finish_reason "content_filter"
  refusal         200, message.refusal set, content null
  garbage         200, a body that is not JSON
  no-choices      200, {"error": {...}} and no choices
  truncated-body  200, Content-Length larger than the body, then the connection closes
  drop            the connection closes without a reply
  sleep           waits `sleep_s` (past the client's timeout), then replies ok
  429             429 with Retry-After: `retry_after` (seconds)
  429-date        429 with Retry-After as an HTTP date `retry_after` seconds ahead
  429-long        429 with Retry-After: 100000
  quota           429 {"error": {"code": "insufficient_quota"}}
  500, 503        server errors
  400             bad request (e.g. the prompt is too long for the model)
  401             refused key; the body echoes the Authorization header it got, as some
                  servers do, so the tests can check that edge_pu scrubs it
  404             unknown model
  redirect        307 to `redirect_to`

Every request is recorded in `requests` (prompt, cue, headers, body); `answered` counts the
successful replies per prompt. Usage: prompt_tokens = words in the messages + 5, completion_tokens
= words in the answer, so tests can compute the token budget by hand.
"""

from __future__ import annotations

import email.utils
import json
import socket
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Request:
    path: str
    prompt: str
    cue: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FaultServer:
    script: dict[str, list[str]] = field(default_factory=dict)
    default: str = "ok"
    sleep_s: float = 0.5
    retry_after: float = 2.0
    redirect_to: str = ""
    requests: list[Request] = field(default_factory=list)
    answered: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, list[str]] = defaultdict(list)
        for prompt, cues in self.script.items():
            self._queues[prompt] = list(cues)
        self._httpd: ThreadingHTTPServer | None = None
        self._tokens = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> FaultServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                server._handle(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda request, client_address: None  # client went away
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def count(self, prompt: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if prompt is None or r.prompt == prompt)

    def tokens_reported(self) -> int:
        """Sum of usage.total_tokens over every reply that carried a usage object."""
        with self._lock:
            return self._tokens

    # ---- one request -----------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        try:
            body = json.loads(h.rfile.read(length) or b"{}")
        except ValueError:
            body = {}
        messages = body.get("messages") or [{}]
        prompt = str(messages[-1].get("content", ""))
        with self._lock:
            queue = self._queues[prompt]
            cue = queue.pop(0) if queue else self.default
            self.requests.append(Request(h.path, prompt, cue, dict(h.headers.items()), body))
        if h.path != "/v1/chat/completions":
            return self._json(h, 404, {"error": {"message": f"no route {h.path}"}})
        words = sum(len(str(m.get("content", "")).split()) for m in messages) + 5
        answer = f"anchor: {prompt}"
        if cue == "sleep":
            time.sleep(self.sleep_s)
            cue = "ok"
        if cue in ("ok", "length", "length-empty", "empty", "filter", "refusal"):
            text: str | None = {"ok": answer, "length": answer[:8], "length-empty": "",
                                "empty": "", "filter": None, "refusal": None}[cue]
            finish = {"length": "length", "length-empty": "length", "filter": "content_filter"
                      }.get(cue, "stop")
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if cue == "refusal":
                message["refusal"] = "I can't help with that."
            completion = len((text or "").split())
            usage = {"prompt_tokens": words, "completion_tokens": completion,
                     "total_tokens": words + completion}
            with self._lock:
                self._tokens += usage["total_tokens"]
                if cue in ("ok", "length"):
                    self.answered[prompt] += 1
            return self._json(h, 200, {"id": "x", "object": "chat.completion",
                                       "choices": [{"index": 0, "message": message,
                                                    "finish_reason": finish}],
                                       "usage": usage})
        if cue == "garbage":
            return self._raw(h, 200, b"<html>502 Bad Gateway</html>", "text/html")
        if cue == "no-choices":
            return self._json(h, 200, {"error": {"message": "model overloaded"}})
        if cue == "truncated-body":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "500")
            h.end_headers()
            h.wfile.write(b'{"choices": [{"mess')
            h.wfile.flush()
            h.close_connection = True
            return None
        if cue == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return None
        if cue in ("429", "429-date", "429-long"):
            after = {"429": f"{self.retry_after:g}", "429-long": "100000",
                     "429-date": email.utils.formatdate(time.time() + self.retry_after,
                                                        usegmt=True)}[cue]
            return self._json(h, 429, {"error": {"message": "rate limited"}},
                              {"Retry-After": after})
        if cue == "quota":
            return self._json(h, 429, {"error": {"message": "You exceeded your current quota",
                                                 "code": "insufficient_quota"}})
        if cue in ("500", "503", "400", "404"):
            return self._json(h, int(cue), {"error": {"message": f"status {cue}"}})
        if cue == "401":
            got = h.headers.get("Authorization", "")
            return self._json(h, 401, {"error": {"message": f"Incorrect API key provided: {got}"}})
        if cue == "redirect":
            return self._json(h, 307, {}, {"Location": self.redirect_to})
        raise AssertionError(f"unknown cue {cue!r}")

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, code: int, payload: dict[str, Any],
              headers: dict[str, str] | None = None) -> None:
        FaultServer._raw(h, code, json.dumps(payload).encode(), "application/json", headers)

    @staticmethod
    def _raw(h: BaseHTTPRequestHandler, code: int, data: bytes, ctype: str,
             headers: dict[str, str] | None = None) -> None:
        h.send_response(code)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(data)
        except OSError:
            pass  # the client timed out and left


def closed_port() -> int:
    """A loopback port with nothing listening (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(root: Path, student: Path, url: str, run_dir: Path, *, n_prompts: int, k: int,
               stages: str, prompts: list[str] | None = None, teacher: str = "",
               sampling: str = "") -> Path:
    """A run config (root/<run_dir name>.yaml) on `student` with the OpenAI teacher at `url`:
    n_prompts prompts "say i twice" (root/prompts.jsonl, shared by the runs under root), K
    candidates of at most 12 tokens, and `stages`: the YAML lines of its sft/train sections.
    `prompts` replaces the "say i twice" ones, `teacher` (a YAML flow mapping) the OpenAI
    teacher, and `sampling` is added to the sampling section ("engine: llama-cpp")."""
    path = root / "prompts.jsonl"
    if not path.exists():
        texts = prompts if prompts is not None else [f"say {i} twice" for i in range(n_prompts)]
        path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                                for i, p in enumerate(texts)))
    teacher = teacher or (f'{{kind: openai, base_url: "{url}", model: m, timeout_s: 10, '
                          'retries: 2, backoff_s: 0.05}')
    cfg = root / f"{run_dir.name}.yaml"
    cfg.write_text(f"""
student: {{path: {student}}}
teacher: {teacher}
data: {{prompts: {path}}}
sampling: {{k: {k}, max_new_tokens: 12, prompt_batch: 2{", " + sampling if sampling else ""}}}
ranker: {{batch_size: {k}}}
{stages.strip()}
backend: cpu
run_dir: {run_dir}
""")
    return cfg
