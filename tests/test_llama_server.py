"""edge_pu.teachers.llama_server: a real `python -m llama_cpp.server` on a tiny f16 GGUF (the
tiny Llama written by edge_pu's own GGUF writer), reached through the OpenAI teacher, and always
stopped: at the end of the block, on an error inside it, on SIGINT (Ctrl-C) or SIGTERM to the
process that holds it, and (Linux) when that process is killed outright. "Stopped" is checked
from outside: the server's pid is gone and its port accepts a new listener.

The demo's served-teacher step (edge_pu.demo.anchor_with_served_teacher, what `edge-pu demo
--preset qwen` runs with the 1.5B teacher) is run on the same tiny GGUF: every training prompt
is anchored through the server, the run's prompts file holds the anchored ones, the anchor pass
share is the checker's verdict on each anchor, and a second call starts no server.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from real_models import require_module

from edge_pu.config import TeacherConfig, load_config
from edge_pu.jsonl import read_jsonl
from edge_pu.teachers.llama_server import llama_server
from edge_pu.teachers.openai import OpenAITeacher

pytestmark = pytest.mark.slow  # each test starts a real llama.cpp server (a few seconds)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    require_module("llama_cpp.server", "pip install 'llama-cpp-python[server]'")
    from edge_pu.export.gguf_writer import write_gguf

    return write_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf", "f16")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is dead but not yet reaped by its parent: it holds no port and runs nothing.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def _port_free(port: int) -> bool:
    """Nothing listens on it: a new server can bind it (SO_REUSEADDR, as servers do, since the
    closed connections' TIME_WAIT entries linger for a minute) and a connect is refused."""
    with socket.socket() as c:
        if c.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_gone(pid: int, port: int, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    while not (_gone(pid) and _port_free(port)):
        assert time.monotonic() < deadline, f"server pid {pid} / port {port} still there"
        time.sleep(0.1)


def _teacher(base_url: str, **kw: object) -> OpenAITeacher:
    return OpenAITeacher(TeacherConfig(kind="openai", base_url=base_url, model="tiny",
                                       max_tokens=8, timeout_s=60, **kw))


def test_serves_one_chat_completion_then_stops(tiny_gguf: Path, tmp_path: Path) -> None:
    with llama_server(tiny_gguf, alias="tiny", log=tmp_path / "server.log",
                      n_threads=1) as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert not _gone(server.pid) and not _port_free(server.port)
        teacher = _teacher(server.base_url)
        # max_tokens 8 with no EOS: the random tiny model's answer is cut at 8 tokens.
        answer = teacher.answer("say hello")
        assert answer and teacher.last_finish_reason in ("stop", "length")
        assert teacher.last_usage and teacher.last_usage["completion_tokens"] <= 8
    # The context manager reaped the child: no process, no zombie, the port is free at once.
    assert _gone(server.pid) and _port_free(server.port)
    log = (tmp_path / "server.log").read_text()
    assert "--n_threads 1" in log and "/v1/chat/completions" in log


def test_an_error_inside_the_block_still_stops_the_server(tiny_gguf: Path,
                                                         tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="the pipeline failed"):
        with llama_server(tiny_gguf, alias="tiny", log=tmp_path / "server.log") as server:
            raise RuntimeError("the pipeline failed")
    assert _gone(server.pid) and _port_free(server.port)


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path: Path) -> None:
    require_module("llama_cpp.server", "pip install 'llama-cpp-python[server]'")
    from edge_pu.errors import EdgePuError

    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(EdgePuError, match=r"exited with code \d+ while starting not-a-model"):
        with llama_server(bad, alias="bad", log=tmp_path / "server.log"):
            pytest.fail("the block must not run")
    with pytest.raises(EdgePuError, match="does not exist"):
        with llama_server(tmp_path / "missing.gguf", alias="x", log=tmp_path / "server.log"):
            pass


# The preset's lifecycle in a child process: the server is started, the teacher is asked (here
# forever, so the signal surely lands mid-stage), the pid and port are printed for the test.
_HOLDER = textwrap.dedent("""
    import signal
    import sys
    from edge_pu.config import TeacherConfig
    from edge_pu.teachers.llama_server import llama_server
    from edge_pu.teachers.openai import OpenAITeacher

    # What a terminal gives a process (a background job may inherit SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with llama_server(sys.argv[1], alias="tiny", log=sys.argv[2], n_threads=1) as server:
        teacher = OpenAITeacher(TeacherConfig(kind="openai", base_url=server.base_url,
                                              model="tiny", max_tokens=8))
        teacher.answer("warm up")
        print(server.pid, server.port, flush=True)
        while True:
            teacher.answer("say hello")
""")


def _holder(tiny_gguf: Path, tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tiny_gguf),
                             str(tmp_path / "server.log")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the holder exited early:\n{proc.communicate()[1]}"
    pid, port = map(int, line.split())
    assert not _gone(pid)
    return proc, pid, port


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_to_the_holder_stops_the_server(sig: signal.Signals, tiny_gguf: Path,
                                                          tmp_path: Path) -> None:
    proc, pid, port = _holder(tiny_gguf, tmp_path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert ("KeyboardInterrupt" if sig == signal.SIGINT else "") in err
    _wait_gone(pid, port, within_s=5)  # the holder waited for the server before exiting


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_the_holder_still_stops_the_server(tiny_gguf: Path, tmp_path: Path) -> None:
    proc, pid, port = _holder(tiny_gguf, tmp_path)
    proc.kill()  # no finally runs: the kernel's parent-death signal stops the server
    proc.communicate(timeout=60)
    _wait_gone(pid, port)


def test_demo_anchors_with_the_served_teacher(tiny_gguf: Path, tiny_llama_dir: Path,
                                              tmp_path: Path) -> None:
    from edge_pu.demo import anchor_with_served_teacher
    from edge_pu.jsonl import write_jsonl_atomic
    from edge_pu.pipeline import prepare_run_dir
    from edge_pu.tasks import generate_tasks, passed

    out = tmp_path / "run"
    tasks = generate_tasks(4, seed=0)
    write_jsonl_atomic(out / "teacher_prompts.jsonl",
                       [{"id": t.id, "prompt": t.prompt} for t in tasks])
    cfg = load_config(None, [f"student.path={tiny_llama_dir}", "teacher.kind=openai",
                             "teacher.model=tiny", "teacher.max_tokens=8",
                             f"data.prompts={out / 'train_prompts.jsonl'}", f"run_dir={out}"])
    prepare_run_dir(cfg)
    served, report = anchor_with_served_teacher(cfg, tiny_gguf, tasks, out, n_threads=1)
    port = int(served.teacher.base_url.rsplit(":", 1)[1].split("/")[0])
    assert _port_free(port)  # stopped before returning
    anchors = {a["id"]: a["anchor"] for a in read_jsonl(out / "anchors.jsonl")}
    assert sorted(anchors) == sorted(t.id for t in tasks)
    assert [r["id"] for r in read_jsonl(out / "train_prompts.jsonl")] == [t.id for t in tasks]
    share = report["anchor_pass"]
    assert share["anchored"] == 4 and report["failed"] == 0
    assert share["passed"] == sum(passed(t, anchors[t.id]) for t in tasks)
    assert share["share"] == share["passed"] / 4
    assert json.dumps(report)  # it goes into demo_report.json as is

    # Everything is anchored: the second call starts no server and asks nothing.
    (out / "teacher_server.log").unlink()
    again, report2 = anchor_with_served_teacher(cfg, tiny_gguf, tasks, out, n_threads=1)
    assert not (out / "teacher_server.log").exists()
    assert report2["anchor_pass"] == share
    assert len(read_jsonl(out / "teacher_requests.jsonl")) == 4
