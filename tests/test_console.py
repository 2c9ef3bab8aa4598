"""A clean console: `edge-pu run --json` prints one JSON summary on stdout and no library
FutureWarning on stderr; `--quiet` prints only the summary; other packages' future and
deprecation warnings go to the log at debug level while edge_pu's own warnings still show."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from edge_pu.console import configure_logging, demo_summary


def _config(root: Path, student: Path) -> Path:
    prompts, answers = root / "prompts.jsonl", root / "answers.jsonl"
    texts = ["what is two plus three?", "list three red fruits", "name a capital city"]
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n"
                               for i, t in enumerate(texts)))
    answers.write_text("".join(json.dumps({"prompt": t, "anchor": "the answer is one"}) + "\n"
                               for t in texts))
    cfg = root / "run.yaml"
    cfg.write_text(f"""
student: {{path: {student}}}
teacher: {{kind: file, path: {answers}}}
data: {{prompts: {prompts}}}
sampling: {{k: 2, max_new_tokens: 6}}
sft: {{steps: 1, batch_size: 2, micro_batch: 2}}
train: {{algorithm: dpo, steps: 1, batch_size: 1, micro_batch: 1}}
backend: cpu
run_dir: {root / "run"}
""")
    return cfg


def _edge_pu(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "EDGE_PU_LOG")}
    return subprocess.run([sys.executable, "-m", "edge_pu", *args], capture_output=True,
                          text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)


@pytest.mark.slow  # two real `edge-pu run` processes on the tiny Llama
def test_run_json_summary_and_quiet(tmp_path: Path, tiny_llama_dir: Path) -> None:
    cfg = _config(tmp_path, tiny_llama_dir)
    out = _edge_pu("run", str(cfg), "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)  # stdout is the JSON and nothing else
    run_dir = tmp_path / "run"
    assert summary["command"] == "run" and summary["run_dir"] == str(run_dir.resolve())
    assert summary["adapter"] == str((run_dir / "adapter").resolve())
    assert Path(summary["adapter"], "adapter_config.json").exists()
    assert Path(summary["files"]["metrics"]).exists() and Path(summary["files"]["anchors"]
                                                               ).exists()
    m = summary["metrics"]
    assert m["prompts"] == 3 and m["anchored"] == 3 and m["sft"]["steps"] == 1
    assert [r["round"] for r in m["rounds"]] == [1] and "loss_last" in m["rounds"][0]
    assert summary["exports"] == {}
    assert "[config] resolved" in out.stderr  # the progress went to stderr
    assert "FutureWarning" not in out.stderr and "DeprecationWarning" not in out.stderr

    again = _edge_pu("run", str(cfg), "--quiet")  # resumes: nothing left to train
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr == ""
    assert again.stdout.lstrip().startswith("edge-pu run: done")
    assert f"adapter           {run_dir.resolve() / 'adapter'}" in again.stdout
    assert "[config]" not in again.stdout and "[round 1]" not in again.stdout


def test_library_deprecations_go_to_the_debug_log(capsys: pytest.CaptureFixture[str],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    import edge_pu

    ours = str(Path(edge_pu.__file__).parent / "pipeline.py")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_logging()
        logging.getLogger("py.warnings").propagate = True  # let caplog see the records too
        try:
            warnings.warn_explicit("old api", FutureWarning, "/site-packages/lib/x.py", 3)
            warnings.warn_explicit("going away", DeprecationWarning, "/site-packages/y.py", 4)
            warnings.warn_explicit("check this", UserWarning, "/site-packages/lib/x.py", 5)
            warnings.warn_explicit("ours", FutureWarning, ours, 6)
        finally:
            logging.getLogger("py.warnings").propagate = False
    err = capsys.readouterr().err
    assert "old api" not in err and "going away" not in err  # not on the console
    assert "check this" in err and "ours" in err  # every other warning still shows
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("FutureWarning: old api" in d for d in debug)
    assert any("DeprecationWarning: going away" in d for d in debug)


def test_demo_summary_names_the_pass_rates_and_exports(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"prompts": 54, "anchored": 54}))
    (tmp_path / "demo_report.json").write_text(json.dumps({
        "before": {"pass_rate": 0.1}, "after_sft": {"pass_rate": 0.4}, "after": {"pass_rate": 0.5},
        "exports": {"gguf": {"passed": True, "checks": {}}}}))
    (tmp_path / "export" / "gguf").mkdir(parents=True)
    (tmp_path / "export" / "gguf" / "model-q8_0.gguf").write_bytes(b"GGUF")
    s = demo_summary(tmp_path)
    assert s["metrics"]["pass_rate"] == {"before": 0.1, "after_sft": 0.4, "after": 0.5}
    assert s["exports"]["gguf"] == {"passed": True, "artifacts": [
        str((tmp_path / "export" / "gguf" / "model-q8_0.gguf").resolve())]}
    assert s["files"]["demo_report"] == str((tmp_path / "demo_report.json").resolve())
