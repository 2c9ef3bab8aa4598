"""`edge-pu demo` end to end on a tiny Llama (the real SmolLM2 demo takes minutes; its numbers are
in the issue notes): the report holds before/after scores on the held-out prompts, one anchor
per training prompt, and the adapter it trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_pu.cli import main


@pytest.mark.parametrize("algorithm", ["dpo", "grpo"])
def test_demo_runs_on_a_tiny_student(algorithm: str, tiny_llama_dir: Path, tmp_path: Path
                                     ) -> None:
    run_dir = tmp_path / "demo"
    code = main(["demo", "--algorithm", algorithm, "--student", str(tiny_llama_dir),
                 "--run-dir", str(run_dir), "--set", "train.steps=2",
                 "--set", "sft.steps=3", "--set", "sampling.max_new_tokens=6"])
    assert code == 0
    report = json.loads((run_dir / "demo_report.json").read_text())
    assert report["algorithm"] == algorithm
    assert report["train_prompts"] == 54 and report["heldout_prompts"] == 36
    for side in ("before", "after_sft", "after"):
        assert 0.0 <= report[side]["pass_rate"] <= 1.0 and report[side]["n"] == 36
        assert len(report[side]["by_family"]) == 9
    anchors = [json.loads(x) for x in (run_dir / "anchors.jsonl").read_text().splitlines()]
    assert len(anchors) == 54
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if "step" in m and m.get("stage") == "sft"] == [1, 2, 3]
    assert [m["step"] for m in steps if "step" in m and m.get("stage") != "sft"] == [1, 2]
    page = (run_dir / "report.html").read_text()  # written at the end (edge_pu.report)
    assert "after PU" in page and "PU round" in page
    # The workload preview: its prompts answered before and after, each constraint checked.
    from edge_pu.tasks.constraints import follows

    preview = report["workload_preview"]
    assert len(preview) == 3 and all(p["id"].startswith("if_") for p in preview)
    for p in preview:
        for side in ("before", "after"):
            assert p[f"kept_{side}"] == [follows(c, p[side]) for c in p["constraints"]]


def test_demo_refuses_a_run_dir_of_other_settings_until_restart(tiny_llama_dir: Path,
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture
                                                                ) -> None:
    run_dir = tmp_path / "demo"
    base = ["demo", "--student", str(tiny_llama_dir), "--run-dir", str(run_dir),
            "--set", "train.steps=1", "--set", "sft.steps=1",
            "--set", "sampling.max_new_tokens=4"]
    assert main(base + ["--algorithm", "dpo"]) == 0
    capsys.readouterr()
    assert main(base + ["--algorithm", "grpo"]) != 0
    err = capsys.readouterr().err
    assert "train.algorithm" in err and "--restart" in err
    assert "before" not in err  # refused before the student was loaded and evaluated
    assert main(base + ["--algorithm", "grpo", "--restart"]) == 0
    report = json.loads((run_dir / "demo_report.json").read_text())
    assert report["algorithm"] == "grpo"


def test_qwen_preset_names_the_fetch_command_of_a_missing_model(
        tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """Refused before any server starts or model loads: first the student, then the teacher."""
    monkeypatch.setenv("EDGE_PU_CACHE", str(tmp_path / "empty-cache"))
    run_dir = tmp_path / "qwen"
    assert main(["demo", "--preset", "qwen", "--run-dir", str(run_dir)]) == 2
    assert "`edge-pu fetch qwen-0.5b`" in capsys.readouterr().err
    assert main(["demo", "--preset", "qwen", "--run-dir", str(run_dir),
                 "--student", str(tiny_llama_dir)]) == 2
    assert "`edge-pu fetch qwen-1.5b`" in capsys.readouterr().err
    assert not (run_dir / "teacher_server.log").exists()
    assert not (run_dir / "anchors.jsonl").exists()
