"""`edge-pu serve` on the tiny finished run's verified f16 GGUF: a real OpenAI-style HTTP
request on loopback is answered (plain and streamed); with an API key set, a request without it
(or with another) is refused with 401, and the key is never printed; a browser request from
another origin is refused; a non-loopback address is refused without --allow-remote and a key,
before anything is loaded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from edge_pu.cli import main

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] is what serves")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, body: dict[str, Any] | None = None, key: str = "",
          headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers=h, method="POST" if body else "GET")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_serve_answers_openai_requests_and_refuses_without_the_key(
        finished_run: Path, tmp_path: Path) -> None:
    key = f"sk-serve-{uuid.uuid4().hex}"
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "EDGE_PU_SERVE_KEY": key, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edge_pu", "serve", str(finished_run),
                                 "--port", str(port), "--api-key-env", "EDGE_PU_SERVE_KEY"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"serve exited early:\n{log.read_text()}"
            try:
                status, raw = _call(f"{base}/models", key=key)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, f"serve never listened:\n{log.read_text()}"
                time.sleep(0.5)
        assert status == 200
        model = json.loads(raw)["data"][0]["id"]
        assert model == f"edge-pu-{finished_run.name}"
        ask = {"model": model, "max_tokens": 8, "temperature": 0,
               "messages": [{"role": "user", "content": "what is two plus three?"}]}
        status, raw = _call(f"{base}/chat/completions", ask, key=key)
        assert status == 200, raw
        reply = json.loads(raw)
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["message"]["role"] == "assistant"
        assert isinstance(reply["choices"][0]["message"]["content"], str)
        assert reply["usage"]["completion_tokens"] >= 1
        status, raw = _call(f"{base}/chat/completions", {**ask, "stream": True}, key=key)
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[0])["object"] == "chat.completion.chunk"
        for wrong in ("", "sk-not-the-key"):
            assert _call(f"{base}/chat/completions", ask, key=wrong)[0] == 401
            assert _call(f"{base}/models", key=wrong)[0] == 401
        assert _call(f"{base}/models", key=key, headers={"Origin": "http://evil.example"}
                     )[0] == 403
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert key not in log.read_text()


@pytest.mark.parametrize(("args", "match"), [
    (["--host", "0.0.0.0"], "--allow-remote"),
    (["--host", "192.0.2.1", "--allow-remote"], "needs an API key"),
    (["--api-key-env", "EDGE_PU_UNSET_KEY_VAR"], "not set in the environment"),
])
def test_serve_refuses_unsafe_or_broken_settings_before_loading(
        args: list[str], match: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGE_PU_UNSET_KEY_VAR", raising=False)
    assert main(["serve", str(tmp_path), *args]) != 0  # tmp_path is no run: nothing to load
    assert match in capsys.readouterr().err


def test_serve_needs_a_verified_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert main(["serve", str(tmp_path)]) != 0
    assert "--format gguf" in capsys.readouterr().err
