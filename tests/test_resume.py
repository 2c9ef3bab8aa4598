"""SIGKILL `edge-pu run` at points inside every stage, resume, and compare with a clean run.

The teacher is a real HTTP server on loopback (tests/servers.py) that answers after a short
delay, so the anchor stage lasts long enough to be killed inside. Each kill is a real SIGKILL of
the `edge-pu run` process, sent when a run-dir file reaches a given size. After the last resume:
one anchor per prompt and one ledger "ok" per prompt, every candidate exactly once, and the same
training metrics and adapter weights as an uninterrupted run with the same seed (CPU training is
deterministic here, so the tolerance is float noise).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from edge_pu.jsonl import read_jsonl

pytestmark = pytest.mark.slow

N_PROMPTS, K, ROUNDS, STEPS = 8, 4, 2, 4


def _config(root: Path, student: Path, url: str, run_dir: Path) -> Path:
    from servers import run_config

    return run_config(root, student, url, run_dir, n_prompts=N_PROMPTS, k=K, stages=(
        f"train: {{steps: {STEPS}, batch_size: 2, micro_batch: 1, rounds: {ROUNDS}, "
        "lr: 0.01}"))


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _run(cfg: Path, until: tuple[str, int] | None = None) -> tuple[int, dict[str, int]]:
    """Run edge-pu; with `until=(file, lines)`, SIGKILL it once that file has that many lines.

    Returns (return code, line counts of the run dir's files at the end)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edge_pu", "run", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = Path(cfg.read_text().split("run_dir:")[1].strip())
    while proc.poll() is None:
        if until and _lines(run_dir / until[0]) >= until[1]:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate()
    counts = {n: _lines(run_dir / n) for n in ("anchors.jsonl", "candidates.jsonl",
                                               "scores.jsonl", "metrics.jsonl")}
    assert proc.returncode in (0, -signal.SIGKILL), err.decode()[-2000:]
    return proc.returncode, counts


def test_sigkill_in_every_stage_then_resume_matches_clean_run(tiny_llama_dir: Path,
                                                              tmp_path: Path) -> None:
    from servers import FaultServer

    with FaultServer(default="sleep", sleep_s=0.15) as server:
        clean = tmp_path / "clean"
        rc, _ = _run(_config(tmp_path, tiny_llama_dir, server.base_url, clean))
        assert rc == 0
        clean_requests = len(server.requests)

        killed = tmp_path / "killed"
        cfg = _config(tmp_path, tiny_llama_dir, server.base_url, killed)
        per_round = N_PROMPTS * K
        kill_points = [
            ("anchors.jsonl", 3),                 # anchors: mid-stage
            ("candidates.jsonl", 2 * K),          # round 1 sampling
            ("scores.jsonl", 3),                  # round 1 ranking
            ("metrics.jsonl", 2),                 # round 1 training, after 2 steps
            ("candidates.jsonl", per_round + K),  # round 2 sampling
            ("metrics.jsonl", STEPS + 1 + 2),     # round 2 training
        ]
        kills = []
        before = len(server.requests)
        for point in kill_points:
            rc, counts = _run(cfg, until=point)
            kills.append((point, rc, counts))
            if rc == 0:
                break
        rc, _ = _run(cfg)
        assert rc == 0
        sigkilled = [k for k in kills if k[1] == -signal.SIGKILL]
        assert len(sigkilled) >= 5, kills

    # Anchors: exactly one per prompt; one successful teacher call per prompt. A request in
    # flight at a kill is lost with the process, so the server may have seen one more.
    anchors = read_jsonl(killed / "anchors.jsonl")
    assert sorted(a["id"] for a in anchors) == sorted(f"p{i}" for i in range(N_PROMPTS))
    # At most one successful answer per prompt, ever. (The anchor is written before its ledger
    # line, so a kill in between leaves an anchor whose "ok" line is missing: never the reverse.)
    ok = Counter(e["id"] for e in read_jsonl(killed / "teacher_ledger.jsonl")
                 if e["status"] == "ok")
    assert max(ok.values()) == 1 and set(ok) <= {a["id"] for a in anchors}
    assert len(ok) >= N_PROMPTS - len(sigkilled)
    assert clean_requests == N_PROMPTS
    # Requests are logged (fsynced) before they go out, so one in flight at a kill is counted
    # too, and one logged but killed before it was sent counts without reaching the server.
    sent = read_jsonl(killed / "teacher_requests.jsonl")
    assert len(server.requests) - before <= len(sent) <= N_PROMPTS + 1

    # Candidates: every (round, prompt, k) exactly once.
    cands = Counter((c["round"], c["prompt_id"], c["k"])
                    for c in read_jsonl(killed / "candidates.jsonl"))
    assert set(cands.values()) == {1} and len(cands) == ROUNDS * N_PROMPTS * K

    # Training: the same steps with the same numbers as the clean run.
    def steps(d: Path) -> list[tuple[int, int, float]]:
        return [(m["round"], m["step"], m["loss"]) for m in read_jsonl(d / "metrics.jsonl")
                if "step" in m]

    got, want = steps(killed), steps(clean)
    assert [(r, s) for r, s, _ in got] == [(r, s) for r, s, _ in want]
    assert [loss for *_, loss in got] == pytest.approx([loss for *_, loss in want], abs=1e-5)

    from safetensors.torch import load_file

    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(clean / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key


def test_sigterm_exits_like_ctrl_c_and_keeps_what_was_written(tiny_llama_dir: Path,
                                                             tmp_path: Path) -> None:
    """SIGTERM to `edge-pu run` while the teacher holds the third prompt's request: exit code
    143 (128 + SIGTERM, what a supervisor or CI runner expects), Ctrl-C's message and no
    traceback; the two anchors already written stay, and the rerun asks only for the rest."""
    from servers import FaultServer, run_config

    from edge_pu.cli import main

    with FaultServer(script={"say 2 twice": ["sleep"]}, sleep_s=60.0) as server:
        run_dir = tmp_path / "run"
        cfg = run_config(tmp_path, tiny_llama_dir, server.base_url, run_dir, n_prompts=4, k=2,
                         stages="train: {steps: 1, batch_size: 1, micro_batch: 1}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "edge_pu", "run", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None and not (server.count("say 2 twice")
                                           and _lines(run_dir / "anchors.jsonl") == 2):
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)  # torch's interpreter exit is slow on busy cores
        assert proc.returncode == 143, err[-2000:]
        assert ("edge-pu: interrupted (SIGTERM); rerun the same command to continue where it "
                "stopped.") in err and "Traceback" not in err, err[-2000:]
        assert [a["id"] for a in read_jsonl(run_dir / "anchors.jsonl")] == ["p0", "p1"]

        assert main(["anchors", str(cfg)]) == 0
        assert sorted(a["id"] for a in read_jsonl(run_dir / "anchors.jsonl")) == [
            "p0", "p1", "p2", "p3"]
        assert [server.count(f"say {i} twice") for i in (0, 1, 3)] == [1, 1, 1]
