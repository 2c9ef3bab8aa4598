"""A GGUF behind llama-cpp-python's OpenAI-compatible server, on a free loopback port, for as
long as a with-block runs: a local teacher reached exactly as a user's vLLM or Ollama would be
(`teacher.kind: openai`, edge_pu.teachers.openai).

    with llama_server(gguf, alias="qwen2.5-coder-1.5b-instruct", n_threads=2) as server:
        cfg = ... teacher.base_url = server.base_url, teacher.model = server.alias ...

The server is `python -m llama_cpp.server` in a child process (its own process group, so a
terminal's Ctrl-C reaches edge_pu alone, which then stops it in order), listening on
127.0.0.1 only. Entering waits until GET /v1/models answers; a server that exits or does not
answer within `start_timeout_s` is an EdgePuError with the tail of its log. Leaving, whatever
the reason (the block ends, an exception, KeyboardInterrupt), sends SIGTERM, waits `stop_s`,
then SIGKILL, and reaps the child, so no process is left and the port is free. While the block
runs a SIGTERM to edge_pu (a `kill`, a CI timeout) raises SystemExit so the block unwinds the
same way; on Linux the child also gets SIGTERM if edge_pu dies without unwinding (kill -9).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgePuError

HOST = "127.0.0.1"


@dataclass(frozen=True)
class LlamaServer:
    pid: int
    port: int
    alias: str
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"


def free_port() -> int:
    """A loopback port nothing listens on now (the server binds it a moment later)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1


def _parent_death_signal() -> object:
    """A preexec_fn (Linux) that asks for SIGTERM when the parent dies, even by kill -9. libc's
    prctl is looked up here, in the parent: after fork the child may only call it."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1  # noqa: N806 (the kernel's name)
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _answers(base_url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, no proxy
    try:
        with opener.open(f"{base_url}/models", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _tail(log: Path, since: int, n: int = 15) -> str:
    """The last n lines that the server wrote to `log` after byte `since`."""
    try:
        with open(log, "rb") as f:
            f.seek(since)
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen, stop_s: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    proc.wait()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit(143) while the block runs (main thread only), so `finally`
    blocks run; the previous handler comes back afterwards. A Python handler already in place
    is kept: the CLI's raises its own exception (edge_pu.cli: SIGTERM unwinds like Ctrl-C)."""
    if (threading.current_thread() is not threading.main_thread()
            or callable(signal.getsignal(signal.SIGTERM))):
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def llama_server(model: str | Path, *, alias: str, log: str | Path, n_threads: int = 0,
                 n_ctx: int = 2048, start_timeout_s: float = 300.0,
                 stop_s: float = 10.0) -> Iterator[LlamaServer]:
    """Serve `model` (a .gguf) as `alias` on a free loopback port until the block ends.

    n_threads: the server's generation and prompt threads (0: every core this process may use).
    The server's output goes to `log` (appended)."""
    model = Path(model)
    if not model.is_file():
        raise EdgePuError(f"llama server: model {model} does not exist.")
    if importlib.util.find_spec("llama_cpp") is None or \
            importlib.util.find_spec("llama_cpp.server") is None:
        raise EdgePuError("llama server: needs llama-cpp-python's server: pip install "
                          "'edge-pu[gguf]' (llama-cpp-python[server]).")
    threads = n_threads or default_threads()
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "CONFIG_FILE"}  # it would override us
    preexec = _parent_death_signal() if sys.platform == "linux" else None
    with _sigterm_unwinds(), open(log, "ab") as out:
        for attempt in range(3):  # the free port may be taken before the server binds it
            port = free_port()
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host",
                   HOST, "--port", str(port), "--model_alias", alias, "--n_ctx", str(n_ctx),
                   "--n_threads", str(threads), "--n_threads_batch", str(threads)]
            out.write(f"[edge_pu] {' '.join(cmd)}\n".encode())
            out.flush()
            since = out.tell()
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=env, start_new_session=True, preexec_fn=preexec)
            try:
                server = LlamaServer(proc.pid, port, alias, log)
                if _wait_until_up(proc, server, model, since, start_timeout_s,
                                  last=attempt == 2):
                    yield server
                    return
            finally:
                _stop(proc, stop_s)


def _wait_until_up(proc: subprocess.Popen, server: LlamaServer, model: Path, since: int,
                   timeout_s: float, last: bool) -> bool:
    """True once /v1/models answers; False if the port was taken (try another), else raise."""
    deadline = time.monotonic() + timeout_s
    while not _answers(server.base_url):
        if proc.poll() is not None:
            tail = _tail(server.log, since)
            if "address already in use" in tail.lower() and not last:
                return False
            raise EdgePuError(f"llama server: exited with code {proc.returncode} while starting "
                              f"{model.name} (log {server.log}):\n{tail}")
        if time.monotonic() > deadline:
            raise EdgePuError(f"llama server: {model.name} did not answer on "
                              f"{server.base_url}/models within {timeout_s:.0f}s "
                              f"(log {server.log}):\n{_tail(server.log, since)}")
        time.sleep(0.25)
    return True
