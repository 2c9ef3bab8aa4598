"""A run dir belongs to one run at a time (issue 14): real `python -m edge_pu` processes, a real
loopback teacher (tests/servers.py), no model.

The teacher here holds every request until the test opens its gate, so "the first process is
mid-request, holding the lock" is a state the test waits for, not a race it hopes to win.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from servers import FaultServer

from edge_pu.anchors import AnchorStore, anchor_key
from edge_pu.cli import main
from edge_pu.config import load_config
from edge_pu.errors import EdgePuError
from edge_pu.jsonl import read_jsonl
from edge_pu.lock import EXIT_IN_USE, LOCK_NAME, holder, holds, run_dir_lock
from edge_pu.teachers.base import generation_settings

N_PROMPTS = 4
WAIT_S = 30.0  # upper bound on any wait below; the tests take a few seconds


class GatedServer(FaultServer):
    """FaultServer whose requests wait until `gate` is set; `arrived` is set by the first."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gate = threading.Event()
        self.arrived = threading.Event()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        self.arrived.set()
        self.gate.wait(WAIT_S)
        super()._handle(h)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


def write_config(tmp_path: Path, server: FaultServer) -> tuple[Path, Path]:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(f'{{"id": "q{i}", "prompt": "prompt {i}"}}\n'
                            for i in range(N_PROMPTS)))
    run_dir = tmp_path / "run"
    cfgfile = tmp_path / "run.yaml"
    cfgfile.write_text(f"teacher: {{kind: openai, base_url: '{server.base_url}', model: m, "
                       f"timeout_s: {WAIT_S}, backoff_s: 0}}\ndata: {{prompts: '{data}'}}\n"
                       f"run_dir: '{run_dir}'\n")
    return cfgfile, run_dir


def start(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`python -m edge_pu ARGS` in the background; its stdout and stderr go to files."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "edge_pu", *args], stdout=fo, stderr=fe,
                                env=env)
    return proc, out, err


def wait_for(cond, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_second_writer_is_refused_and_wait_queues_behind(tmp_path: Path) -> None:
    """A holds the run dir mid-request; B is refused at once, naming A, and writes nothing;
    C (--wait) says it waits, then finds all 4 prompts anchored: 4 requests in all."""
    with GatedServer() as server:
        cfgfile, run_dir = write_config(tmp_path, server)
        a, a_out, _ = start(tmp_path, "a", "anchors", str(cfgfile))
        try:
            assert server.arrived.wait(WAIT_S), "the first process never asked the teacher"
            assert holder(run_dir)["pid"] == a.pid  # type: ignore[index]
            before = snapshot(run_dir)

            b, _, b_err = start(tmp_path, "b", "anchors", str(cfgfile))
            assert b.wait(WAIT_S) == EXIT_IN_USE
            msg = b_err.read_text()
            assert f"{run_dir}: in use by another edge-pu process (pid {a.pid}" in msg
            assert f"`edge-pu anchors {cfgfile}`" in msg and "--wait" in msg
            assert snapshot(run_dir) == before  # not even config.resolved.yaml

            c, c_out, c_err = start(tmp_path, "c", "anchors", str(cfgfile), "--wait")
            wait_for(lambda: "waiting" in c_err.read_text(), "the --wait process to say so")
            assert f"pid {a.pid}" in c_err.read_text() and c.poll() is None
            server.gate.set()
            assert a.wait(WAIT_S) == 0, a_out.read_text()
            assert c.wait(WAIT_S) == 0, c_err.read_text()
        finally:
            server.gate.set()
            if a.poll() is None:
                a.kill()
    assert [server.count(f"prompt {i}") for i in range(N_PROMPTS)] == [1] * N_PROMPTS
    assert f"{N_PROMPTS} new" in a_out.read_text()
    assert (f"{N_PROMPTS} already anchored, 0 new, 0 failed; 0 teacher requests"
            in c_out.read_text())
    assert len(read_jsonl(run_dir / "anchors.jsonl")) == N_PROMPTS
    assert len(read_jsonl(run_dir / "teacher_requests.jsonl")) == N_PROMPTS


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """kill -9 mid-request: the kernel drops the lock with the process, so the next run takes
    it at once and anchors everything; the lost request still counts (5 sent for 4 prompts)."""
    with GatedServer() as server:
        cfgfile, run_dir = write_config(tmp_path, server)
        a, _, _ = start(tmp_path, "a", "anchors", str(cfgfile))
        try:
            assert server.arrived.wait(WAIT_S)
            a.send_signal(signal.SIGKILL)
            assert a.wait(WAIT_S) == -signal.SIGKILL
            assert holder(run_dir)["pid"] == a.pid  # type: ignore[index]  # its record stays
            t0 = time.monotonic()
            with run_dir_lock(run_dir, command="test"):
                took = time.monotonic() - t0
                assert holder(run_dir)["pid"] == os.getpid()  # type: ignore[index]
            assert took < 0.5
            server.gate.set()
            b, b_out, b_err = start(tmp_path, "b", "anchors", str(cfgfile))
            assert b.wait(WAIT_S) == 0, b_err.read_text()
        finally:
            server.gate.set()
    assert "waiting" not in b_err.read_text()
    assert "1 new" not in b_out.read_text() and f"{N_PROMPTS} new" in b_out.read_text()
    assert len(read_jsonl(run_dir / "anchors.jsonl")) == N_PROMPTS
    assert len(read_jsonl(run_dir / "teacher_requests.jsonl")) == N_PROMPTS + 1


def test_duplicated_anchors_heal_without_a_teacher_call(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """anchors.jsonl as two unlocked writers left it: q0 and q1 twice (the second answers
    differ). One anchor per prompt, the first; 2 dropped; zero requests."""
    with FaultServer() as server:
        cfgfile, run_dir = write_config(tmp_path, server)
        tcfg = load_config(cfgfile).teacher
        settings = generation_settings(tcfg)
        key = {i: anchor_key("openai:m", f"prompt {i}", settings) for i in range(N_PROMPTS)}
        lines = [(0, "first"), (1, "first"), (0, "second"), (2, "first"), (3, "first"),
                 (1, "second")]
        run_dir.mkdir()
        (run_dir / "anchors.jsonl").write_text("".join(json.dumps(
            {"key": key[i], "id": f"q{i}", "prompt": f"prompt {i}", "anchor": f"{which} {i}",
             "teacher": "openai:m"}) + "\n" for i, which in lines))

        store = AnchorStore(run_dir)  # a reader, no lock: ignores them, leaves the file alone
        assert "ignoring 2 duplicate anchors" in capsys.readouterr().out
        assert len(store.by_key) == N_PROMPTS
        assert len((run_dir / "anchors.jsonl").read_text().splitlines()) == len(lines)

        assert main(["anchors", str(cfgfile)]) == 0  # a writer, under the lock: rewrites it
        out = capsys.readouterr().out
        assert server.count() == 0
    assert "removed 2 duplicate anchors" in out and "0 teacher requests" in out
    recs = read_jsonl(run_dir / "anchors.jsonl")
    assert [r["anchor"] for r in recs] == [f"first {i}" for i in range(N_PROMPTS)]


HOLD = ("import sys; from edge_pu.lock import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1], command='holder'):\n"
        "    print('held', flush=True); sys.stdin.read()\n")


@pytest.mark.parametrize("command", ["run", "anchors", "demo", "eval", "export"])
def test_every_writing_command_takes_the_lock(tmp_path: Path, command: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfgfile = tmp_path / "run.yaml"
    cfgfile.write_text(f"teacher: {{kind: file, path: '{tmp_path / 'none.jsonl'}'}}\n"
                       f"run_dir: '{run_dir}'\n")
    argv = {"run": ["run", str(cfgfile)], "anchors": ["anchors", str(cfgfile)],
            "demo": ["demo", "--run-dir", str(run_dir)], "eval": ["eval", "--out", str(run_dir)],
            "export": ["export", str(run_dir), "--format", "hf"]}[command]
    with subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE) as other:
        assert other.stdout is not None and other.stdout.readline() == b"held\n"
        try:
            assert main(argv) == EXIT_IN_USE
        finally:
            other.communicate(b"")  # closes its stdin: it lets go and exits
    err = capsys.readouterr().err
    assert f"in use by another edge-pu process (pid {other.pid}" in err and "`holder`" in err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME]


def test_export_of_a_missing_run_dir_creates_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nope"), "--format", "hf"]) != 0
    assert "no such run directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_reentrant_within_one_process(tmp_path: Path) -> None:
    """The CLI holds the lock and library code takes it again: no self-deadlock; the lock
    (and `holds`, which covers sub-folders such as eval's method run dirs) ends with the
    outermost block."""
    with run_dir_lock(tmp_path, command="outer"):
        with run_dir_lock(tmp_path, command="inner"):
            assert holds(tmp_path) and holds(tmp_path / "methods" / "sft")
        assert holds(tmp_path) and holder(tmp_path)["command"] == "outer"  # type: ignore[index]
    assert not holds(tmp_path)
    code = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path)], input=b"",
                          capture_output=True, timeout=WAIT_S).returncode
    assert code == 0  # another process takes it now


def test_a_file_system_without_locks_is_refused(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(EdgePuError, match="does not support file locks .No locks available"):
        with run_dir_lock(tmp_path):
            raise AssertionError("ran unprotected")
    assert not holds(tmp_path)
