"""Bad input, through the command line: each case exits non-zero with one message that names the
culprit (file and line, or the config field) and says what to do, and loses nothing already
written. Run with `edge_pu.cli.main([...])`; the message is read from stderr.

Most cases stop before any model is loaded. The student cases (`edge-pu run`) use the session's
tiny Llama (conftest.py `tiny_llama_dir`) and broken copies of it; they load torch but train
nothing.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import FaultServer

from edge_pu.cli import main
from edge_pu.data import Prompt, check_prompt_lengths, load_prompts
from edge_pu.errors import EdgePuError
from edge_pu.jsonl import append_jsonl, read_jsonl

GOOD_PROMPTS = ['{"id": "a", "prompt": "say one"}', '{"id": "b", "prompt": "say two"}',
                '{"id": "c", "prompt": "say three"}']


def write_setup(tmp: Path, prompts: list[str] | bytes | None = None,
                cfg: dict[str, Any] | None = None) -> Path:
    """prompts.jsonl, a matching anchors file for the `file` teacher, and run.yaml; returns the
    config path. `cfg` is merged over the base config, section by section."""
    data = tmp / "prompts.jsonl"
    if isinstance(prompts, bytes):
        data.write_bytes(prompts)
    else:
        data.write_text("".join(line + "\n" for line in (prompts or GOOD_PROMPTS)),
                        encoding="utf-8")
    anchors = tmp / "teacher_answers.jsonl"
    anchors.write_text("".join(json.dumps({"prompt": json.loads(p)["prompt"], "anchor": "ok"})
                               + "\n" for p in GOOD_PROMPTS))
    base: dict[str, Any] = {"teacher": {"kind": "file", "path": str(anchors)},
                            "data": {"prompts": str(data)}, "run_dir": str(tmp / "run"),
                            "backend": "cpu"}
    for key, value in (cfg or {}).items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


@dataclass
class Case:
    id: str
    expect: list[str]  # substrings of the message (file:line, field, advice)
    prompts: list[str] | bytes | None = None
    cfg: dict[str, Any] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # after `anchors run.yaml`
    env: dict[str, str] = field(default_factory=dict)


CASES = [
    # ---- the prompts file ----
    Case("malformed-jsonl", ["prompts.jsonl:2:", "invalid JSON"],
         prompts=[GOOD_PROMPTS[0], '{"prompt": "unterminated', GOOD_PROMPTS[1]]),
    Case("non-utf8-line", ["prompts.jsonl:2:", "not UTF-8", "save the file as UTF-8"],
         prompts=(GOOD_PROMPTS[0] + "\n" + '{"prompt": "caf\xe9"}\n').encode("latin-1")),
    Case("missing-prompt", ["prompts.jsonl:2:", 'missing field "prompt"', '"question"',
                            "data.prompt_field"],
         prompts=[GOOD_PROMPTS[0], '{"id": "x", "question": "do it"}']),
    Case("empty-prompt", ["prompts.jsonl:3:", '"prompt" is empty'],
         prompts=GOOD_PROMPTS[:2] + ['{"prompt": "   "}']),
    Case("non-string-prompt", ["prompts.jsonl:1:", "must be a string, got list"],
         prompts=['{"prompt": ["a", "b"]}']),
    Case("duplicate-ids", ["prompts.jsonl:3:", "duplicate id 'a'", "first on line 1"],
         prompts=GOOD_PROMPTS[:2] + ['{"id": "a", "prompt": "again"}']),
    Case("bad-id-type", ["prompts.jsonl:1:", 'field "id"'],
         prompts=['{"id": true, "prompt": "x"}']),
    Case("line-not-an-object", ["prompts.jsonl:2:", "expected a JSON object, got list"],
         prompts=[GOOD_PROMPTS[0], '["a list"]']),
    Case("torn-last-line", ["prompts.jsonl:2:", "invalid JSON"],
         prompts=(GOOD_PROMPTS[0] + '\n{"prompt": "cut sh').encode()),
    Case("empty-prompts-file", ["prompts.jsonl", "no prompts found"], prompts=b"\n\n"),
    Case("prompts-not-set", ["data.prompts is not set"], cfg={"data": {"prompts": ""}}),
    Case("prompts-missing", ["nope.jsonl", "data.prompts file not found"],
         cfg={"data": {"prompts": "/nonexistent/nope.jsonl"}}),
    # ---- the config ----
    Case("unknown-key-nearest", ["run.yaml", "unknown config key 'train.lr_rate'",
                                 "Did you mean 'train.lr'"], cfg={"train": {"lr_rate": 1e-4}}),
    Case("key-in-wrong-section", ["unknown config key 'train.k'", "Did you mean 'sampling.k'"],
         cfg={"train": {"k": 4}}),
    Case("other-trainers-name", ["'learning_rate'", "Did you mean 'train.lr'"],
         cfg={"learning_rate": 1e-4}),
    Case("wrong-type", ["run.yaml: train.lr", "expected a number, got 'fast'"],
         cfg={"train": {"lr": "fast"}}),
    Case("not-finite", ["train.lr", "finite"], cfg={"train": {"lr": float("nan")}}),
    Case("whole-number", ["sampling.k", "whole number"], cfg={"sampling": {"k": 2.5}}),
    Case("bad-choice", ["train.algorithm = 'ppo'", "dpo, grpo"],
         cfg={"train": {"algorithm": "ppo"}}),
    Case("k-below-2", ["sampling.k", "at least 2"], cfg={"sampling": {"k": 1}}),
    Case("micro-batch-over-batch", ["train.micro_batch", "train.batch_size"],
         cfg={"train": {"batch_size": 2, "micro_batch": 4}}),
    Case("non-positive", ["lora.r must be > 0"], cfg={"lora": {"r": 0}}),
    Case("negative-retries", ["teacher.retries must be >= 0"], cfg={"teacher": {"retries": -1}}),
    Case("section-not-mapping", ["'train' must be a mapping"], cfg={"train": 5}),
    Case("set-without-equals", ["--set 'train.lr'", "section.key=value"],
         args=["--set", "train.lr"]),
    Case("set-unknown-key", ["--set", "unknown config key 'sampling.kk'", "'sampling.k'"],
         args=["--set", "sampling.kk=4"]),
    Case("set-bad-yaml", ["--set 'train.lr=[1'", "not valid YAML"], args=["--set", "train.lr=[1"]),
    Case("set-empty-key-part", ["--set 'train.=1'", "is not a key"], args=["--set", "train.=1"]),
    # ---- the teacher ----
    Case("base-url-scheme", ["teacher.base_url", "http:// or https://", "ftp://host"],
         cfg={"teacher": {"kind": "openai", "model": "m", "base_url": "ftp://host/v1"}}),
    Case("base-url-credentials", ["teacher.base_url carries a credential", "not shown"],
         cfg={"teacher": {"kind": "openai", "model": "m",
                          "base_url": "https://bob:sk-SECRETVALUE@host/v1"}}),
    Case("api-key-env-unset", ["teacher.api_key_env", "$EDGE_PU_SURELY_UNSET", "export it"],
         cfg={"teacher": {"kind": "openai", "model": "m",
                          "api_key_env": "EDGE_PU_SURELY_UNSET"}}),
    Case("api-key-env-is-a-key", ["teacher.api_key_env must be the NAME", "not shown"],
         cfg={"teacher": {"kind": "openai", "model": "m", "api_key_env": "sk-SECRETVALUE-1"}}),
    Case("api-key-file-missing", ["teacher.api_key_file", "no-key-here", "cannot read"],
         cfg={"teacher": {"kind": "openai", "model": "m", "api_key_file": "/no-key-here"}}),
    Case("openai-without-model", ["teacher.model is required"],
         cfg={"teacher": {"kind": "openai"}}),
    Case("file-teacher-malformed", ["bad_answers.jsonl:1:", '"prompt" and "anchor"'],
         cfg={"teacher": {"path": "@bad_answers"}}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    cfg = copy.deepcopy(case.cfg)
    if cfg.get("teacher", {}).get("path") == "@bad_answers":
        bad = tmp_path / "bad_answers.jsonl"
        bad.write_text('{"prompt": "say one", "text": "no anchor field"}\n')
        cfg["teacher"]["path"] = str(bad)
    path = write_setup(tmp_path, case.prompts, cfg)
    code, err = cli(capsys, "anchors", str(path), *case.args)
    assert code != 0
    assert err.startswith("edge-pu: error: ") and "Traceback" not in err
    for part in case.expect:
        assert part in err, f"{part!r} not in {err!r}"
    assert "SECRETVALUE" not in err
    assert not (tmp_path / "run" / "anchors.jsonl").exists()  # stopped before any anchor


def test_prompts_file_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "prompts_dir"
    folder.mkdir()
    code, err = cli(capsys, "anchors", str(write_setup(tmp_path, cfg={"data": {
        "prompts": str(folder)}})))
    assert code != 0 and "prompts_dir" in err and "is a folder" in err


@pytest.mark.parametrize("text, expect", [
    (None, "config file not found"),
    ("train:\n  lr: 1e-4\n    epochs: 2\n", "run.yaml:3:"),
    ("train:\n  lr: 1e-4\ntrain:\n  epochs: 2\n", "run.yaml:3: key 'train' is given twice"),
    ("- student\n- teacher\n", "must be a mapping of sections"),
    (b"train:\n  lr: 1e-4 # caf\xe9\n", "not UTF-8"),
], ids=["missing", "invalid-yaml-line", "duplicate-key", "not-a-mapping", "not-utf8"])
def test_bad_config_file(text: str | bytes | None, expect: str, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    code, err = cli(capsys, "run", str(path))
    assert code != 0 and "run.yaml" in err and expect in err, err


def test_config_path_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = cli(capsys, "run", str(tmp_path))
    assert code != 0 and "is a folder" in err


def test_empty_section_is_fine(tmp_path: Path) -> None:
    """A section with every key commented out is YAML null, not an error."""
    from edge_pu.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  # lr: 1e-4\nsampling:\n  k: 3\n")
    assert load_config(path).sampling.k == 3


# ---- anchors import -------------------------------------------------------------------------
@pytest.mark.parametrize("content, expect", [
    ('{"prompt": "say one", "anchor": "1"}\n{"prompt": "say two", "anchor": \n',
     "in.jsonl:2: invalid JSON"),
    ('{"prompt": "say one", "anchor": "1"}\n{"prompt": "say two"}\n',
     'in.jsonl:2: needs "prompt" and "anchor"'),
    ('{"prompt": "say one", "anchor": "1"}\n\n{"prompt": "say two", "anchor": " "}\n',
     'in.jsonl:3: "anchor" is empty'),
    (None, "in.jsonl: is a folder"),
], ids=["malformed", "missing-anchor", "empty-anchor-line-3", "folder"])
def test_anchors_import_bad_file(content: str | None, expect: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.jsonl"
    if content is None:
        src.mkdir()
    else:
        src.write_text(content)
    code, err = cli(capsys, "anchors", str(write_setup(tmp_path)), "--import", str(src))
    assert code != 0 and expect in err, err
    assert read_jsonl(tmp_path / "run" / "anchors.jsonl") == []  # nothing half-imported


# ---- the run dir ----------------------------------------------------------------------------
def test_run_dir_started_with_a_different_config(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = write_setup(tmp_path)
    assert cli(capsys, "anchors", str(path))[0] == 0
    before = (tmp_path / "run" / "anchors.jsonl").read_bytes()
    code, err = cli(capsys, "anchors", str(path), "--set", "train.lr=0.1")
    assert code != 0 and "run" in err and "different config" in err and "train.lr" in err
    assert "--restart" in err
    assert (tmp_path / "run" / "anchors.jsonl").read_bytes() == before


def test_run_dir_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").write_text("not a folder")
    code, err = cli(capsys, "anchors", str(write_setup(tmp_path)))
    assert code != 0 and "run_dir" in err and "not a folder" in err


# ---- a disk that fills up -------------------------------------------------------------------
def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, name: str, good_writes: int) -> None:
    """os.write to files called `name`: `good_writes` calls succeed, then one writes half its
    bytes (a partial write, as a full disk gives) and the next raises ENOSPC."""
    real = os.write
    state = {"n": 0, "half": False}

    def write(fd: int, data: Any) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(name):
            return real(fd, data)
        if state["n"] < good_writes:
            state["n"] += 1
            return real(fd, data)
        if not state["half"]:
            state["half"] = True
            return real(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to map fds to files")
def test_disk_full_during_anchors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The third anchor's write fails half way: the message names anchors.jsonl, the two anchors
    already written stay intact, no torn line is left, and a rerun after freeing space
    continues. The third prompt's answer was paid for and could not be kept: it is asked again
    (the only call a full disk can cost)."""
    lines = [json.dumps({"id": f"q{i}", "prompt": f"prompt {i}"}) for i in range(5)]
    with FaultServer() as server:
        path = write_setup(tmp_path, lines, {"teacher": {
            "kind": "openai", "model": "m", "base_url": server.base_url, "backoff_s": 0}})
        _fill_disk_after(monkeypatch, "anchors.jsonl", 2)
        code, err = cli(capsys, "anchors", str(path))
        assert code != 0 and "anchors.jsonl" in err and "No space left on device" in err
        assert "rerun" in err
        anchors = tmp_path / "run" / "anchors.jsonl"
        assert anchors.read_bytes().endswith(b"\n")
        assert [r["id"] for r in read_jsonl(anchors)] == ["q0", "q1"]
        monkeypatch.undo()  # space freed
        assert cli(capsys, "anchors", str(path))[0] == 0
        assert [r["id"] for r in read_jsonl(anchors)] == ["q0", "q1", "q2", "q3", "q4"]
        assert server.answered["prompt 2"] == 2 and server.count() == 6


def test_append_rolls_back_a_partial_write(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.jsonl"
    append_jsonl(path, [{"a": 1}])
    before = path.read_bytes()
    _fill_disk_after(monkeypatch, "x.jsonl", 0)
    with pytest.raises(EdgePuError, match=r"x\.jsonl: could not write \(No space left"):
        append_jsonl(path, [{"b": "x" * 1000}, {"c": 3}])
    assert path.read_bytes() == before  # neither record of the group landed


# ---- jsonl reader details -------------------------------------------------------------------
def test_torn_multibyte_tail_is_dropped_in_run_files(tmp_path: Path) -> None:
    """A crash can cut a record inside a multi-byte character: the tolerant reader drops it
    like any torn line; the strict one (user input) names the line."""
    path = tmp_path / "anchors.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n' + '{"prompt": "caf\u00e9"}'.encode()[:-3])
    assert read_jsonl(path) == [{"prompt": "a"}]
    with pytest.raises(EdgePuError, match=r"anchors\.jsonl:2: not UTF-8"):
        load_prompts(path)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "hi"}\r\n{"prompt": "there"}\r\n')
    assert [p.text for p in load_prompts(path)] == ["hi", "there"]


# ---- prompts longer than the context ------------------------------------------------------
def test_prompts_longer_than_the_context() -> None:
    """student.max_length 64, sampling.max_new_tokens 16: a prompt may use 48 tokens."""
    ps = [Prompt("a", "x", 1), Prompt("b", "y", 2), Prompt("c", "z", 7)]
    check_prompt_lengths(ps, [48, 10, 3], max_length=64, max_new_tokens=16, source="p.jsonl")
    with pytest.raises(EdgePuError) as info:
        check_prompt_lengths(ps, [49, 10, 300], max_length=64, max_new_tokens=16,
                             source="p.jsonl")
    msg = str(info.value)
    assert "2 prompt(s)" in msg and "p.jsonl:1: id 'a' is 49 tokens" in msg
    assert "p.jsonl:7: id 'c' is 300 tokens" in msg and "at most 48 tokens" in msg
    assert "student.max_length" in msg
    with pytest.raises(EdgePuError, match="the model allows 32"):
        check_prompt_lengths(ps, [20, 1, 1], max_length=64, max_new_tokens=16, model_limit=32)
    with pytest.raises(EdgePuError, match="leaves no room"):
        check_prompt_lengths(ps, [1, 1, 1], max_length=16, max_new_tokens=16)


# ---- the student (edge-pu run; loads torch, trains nothing) -------------------------------
@pytest.fixture(scope="module")
def students(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's tiny Llama (conftest.py) and broken variants of it."""
    from tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("students")
    good = tiny_llama_dir
    out = {"good": good}
    out["bin-only"] = root / "bin-only"
    out["bin-only"].mkdir()
    shutil.copy(good / "config.json", out["bin-only"] / "config.json")
    (out["bin-only"] / "pytorch_model.bin").write_bytes(b"pickle would run code")
    out["not-a-model"] = root / "not-a-model"
    out["not-a-model"].mkdir()
    (out["not-a-model"] / "README.md").write_text("hello")
    out["no-template"] = root / "no-template"
    shutil.copytree(good, out["no-template"])
    (out["no-template"] / "chat_template.jinja").unlink()
    out["vocab-mismatch"] = root / "vocab-mismatch"
    shutil.copytree(good, out["vocab-mismatch"])
    big = tiny_tokenizer(vocab_size=1024)
    assert len(big) > 512
    big.save_pretrained(out["vocab-mismatch"])
    return out


@pytest.mark.parametrize("student, cfg, expect", [
    ("/nonexistent/model", {}, ["student.path /nonexistent/model", "no such file"]),
    ("", {}, ["student.path is not set"]),
    ("not-a-model", {}, ["student.path", "not-a-model", "no config.json"]),
    ("bin-only", {}, ["student.path", "bin-only", "no safetensors weights", ".bin"]),
    ("no-template", {}, ["no-template", "no chat template"]),
    ("vocab-mismatch", {}, ["vocab-mismatch", "tokenizer has", "vocab_size is 512"]),
    ("good", {"lora": {"target_modules": ["c_attn"]}},
     ["lora.target_modules ['c_attn']", "q_proj"]),
], ids=["missing", "unset", "not-a-model", "bin-only", "no-chat-template", "vocab-mismatch",
        "lora-targets"])
def test_bad_student(student: str, cfg: dict[str, Any], expect: list[str],
                     students: dict[str, Path], tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    path = str(students[student]) if student in students else student
    cfg = {**cfg, "student": {"path": path}, "sampling": {"k": 2, "max_new_tokens": 4}}
    code, err = cli(capsys, "run", str(write_setup(tmp_path, cfg=cfg)))
    assert code != 0 and "Traceback" not in err
    for part in expect:
        assert part in err, f"{part!r} not in {err!r}"
    assert not (tmp_path / "run" / "adapter").exists()


def test_bad_student_is_found_before_any_teacher_call(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    with FaultServer() as server:
        path = write_setup(tmp_path, cfg={"student": {"path": "/nonexistent/model"}, "teacher": {
            "kind": "openai", "model": "m", "base_url": server.base_url}})
        code, err = cli(capsys, "run", str(path))
        assert code != 0 and "student.path" in err
        assert server.count() == 0


def test_prompt_longer_than_context_via_cli(students: dict[str, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    long = json.dumps({"id": "long", "prompt": "say one " * 200})
    # The teacher refuses every prompt, so until the check exists the run stops cheaply after
    # the anchors ("no prompt has an anchor"); with it, it stops before the first request.
    with FaultServer(default="400") as server:
        path = write_setup(tmp_path, GOOD_PROMPTS + [long], {
            "student": {"path": str(students["good"]), "max_length": 48},
            "sampling": {"k": 2, "max_new_tokens": 4},
            "teacher": {"kind": "openai", "model": "m", "base_url": server.base_url}})
        code, err = cli(capsys, "run", str(path))
        assert code != 0 and "prompts.jsonl:4: id 'long'" in err and "student.max_length" in err
        assert server.count() == 0
