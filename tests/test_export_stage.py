"""`edge-pu run` with an `export:` section ends with verified artifacts; `edge-pu export` on a
run dir resumes (a verified format is not redone) and fails clearly on an unfinished run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_pipeline import tiny_cfg

from edge_pu.cli import main
from edge_pu.pipeline import run

pytestmark = pytest.mark.slow


def test_run_ends_with_verified_exports_and_export_resumes(
        tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed")
    cfg = tiny_cfg(tmp_path, tiny_llama_dir, export={"formats": ["gguf"], "gguf_quant": "f16"},
                   train={"steps": 2})
    run(cfg)
    run_dir = Path(cfg.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["exports"]["gguf"]["passed"] is True
    report = json.loads((run_dir / "export" / "gguf-f16" / "export_report.json").read_text())
    assert report["passed"] is True
    assert (run_dir / "export" / "gguf-f16" / "model-f16.gguf").exists()

    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "gguf", "--quant", "f16"]) == 0
    assert "already verified" in capsys.readouterr().out


def test_export_refuses_an_unfinished_run(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path), "--format", "onnx"]) != 0
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "not a finished run" in err
