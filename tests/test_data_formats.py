"""Prompts in the formats people have: JSONL, JSON array, CSV, Parquet and a folder written by
`datasets.Dataset.save_to_disk`, each holding every kind of record (a prompt string, Alpaca
instruction/input/output, a `messages` conversation with a system prompt and several turns).

Checked: every format reads the same prompts; `data.system_prompt` goes where a record has
none; a transcript is a `file` teacher; a run on a multi-turn file shows the student, at every
stage, exactly the ChatML template applied to each conversation (rendered here by hand, not by
the tokenizer's template); bad records of each format are named by file, line or row and
field, through the CLI, with a non-zero exit.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from edge_pu.cli import main
from edge_pu.config import TeacherConfig
from edge_pu.data import Prompt, iter_prompts, load_prompts, prompt_ids
from edge_pu.errors import EdgePuError
from edge_pu.teachers.base import chat_messages
from edge_pu.teachers.file import FileTeacher

pa = pytest.importorskip("pyarrow", reason="pip install 'edge-pu[data]'")

SYSTEM = "You answer in one word."
RECORDS: list[dict[str, Any]] = [
    {"id": "plain", "prompt": "what is two plus three?", "answer": "five"},
    {"id": "alpaca", "instruction": "sort these words", "input": "pear apple",
     "output": "apple pear"},
    {"id": "alpaca-no-input", "instruction": "name a red fruit", "input": "",
     "output": "cherry"},
    {"id": "chat", "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "list three red fruits"},
        {"role": "assistant", "content": "apple cherry strawberry"},
        {"role": "user", "content": "now only the first"},
        {"role": "assistant", "content": "apple"}]},
    {"id": "chat-open", "messages": [{"role": "user", "content": "say yes"}]},
]
WANT_TURNS = {
    "plain": (("user", "what is two plus three?"),),
    "alpaca": (("user", "sort these words\n\npear apple"),),
    "alpaca-no-input": (("user", "name a red fruit"),),
    "chat": (("system", SYSTEM), ("user", "list three red fruits"),
             ("assistant", "apple cherry strawberry"), ("user", "now only the first")),
    "chat-open": (("user", "say yes"),),
}
WANT_ANSWERS = {"plain": "five", "alpaca": "apple pear", "alpaca-no-input": "cherry",
                "chat": "apple", "chat-open": None}


# ---- writers: the same records in each format ----------------------------------------------
def _columns(records: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r))


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_json(path: Path, records: list[dict[str, Any]]) -> Path:
    path = path.with_suffix(".json")
    path.write_text(json.dumps(records, indent=2))
    return path


def write_csv(path: Path, records: list[dict[str, Any]]) -> Path:
    """A messages cell holds the JSON list; a field a record has not is an empty cell."""
    path = path.with_suffix(".csv")
    cols = _columns(records)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(cols)
        for r in records:
            out.writerow([json.dumps(r[c]) if isinstance(r.get(c), list) else r.get(c, "")
                          for c in cols])
    return path


def _table(records: list[dict[str, Any]]) -> Any:
    cols = _columns(records)
    return pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in records])


def write_parquet(path: Path, records: list[dict[str, Any]]) -> Path:
    import pyarrow.parquet as pq

    path = path.with_suffix(".parquet")
    pq.write_table(_table(records), path, row_group_size=2)  # several row groups
    return path


def write_datasets(path: Path, records: list[dict[str, Any]]) -> Path:
    """The real `datasets` library's save_to_disk, in two shards."""
    datasets = pytest.importorskip("datasets", reason="the dev extra installs datasets")
    datasets.disable_progress_bars()
    folder = path.with_suffix("")
    cols = _columns(records)
    ds = datasets.Dataset.from_list([{c: r.get(c) for c in cols} for r in records])
    ds.save_to_disk(str(folder), num_shards=min(2, len(records)))
    return folder


WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], Path]] = {
    "jsonl": write_jsonl, "json": write_json, "csv": write_csv, "parquet": write_parquet,
    "datasets": write_datasets}


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_record_kind_in_every_format(fmt: str, tmp_path: Path) -> None:
    path = WRITERS[fmt](tmp_path / "prompts", RECORDS)
    prompts = load_prompts(path)
    assert [p.id for p in prompts] == [r["id"] for r in RECORDS]  # file order kept
    assert {p.id: p.turns for p in prompts} == WANT_TURNS
    # One user turn is keyed by its text, as JSONL prompts always were; a conversation by
    # its turns written out.
    by_id = {p.id: p for p in prompts}
    assert by_id["plain"].text == "what is two plus three?"
    assert by_id["chat"].text == (f"System: {SYSTEM}\n\nUser: list three red fruits\n\n"
                                  "Assistant: apple cherry strawberry\n\nUser: now only the "
                                  "first")
    # Read as a teacher file, each record's answer: the trailing assistant turn, the Alpaca
    # output, the answer field; none for a conversation that ends with the user.
    answers = [p.answer for p in iter_prompts(path, teacher=True)]
    assert answers == [WANT_ANSWERS[r["id"]] for r in RECORDS]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_default_ids_are_line_or_row_numbers(fmt: str, tmp_path: Path) -> None:
    records = [{"prompt": "one"}, {"prompt": "two"}]
    prompts = load_prompts(WRITERS[fmt](tmp_path / "p", records))
    want = ["line-00001", "line-00002"] if fmt == "jsonl" else ["row-00001", "row-00002"]
    assert [p.id for p in prompts] == want


def test_csv_prompt_that_starts_with_a_bracket_is_text(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "p", [{"prompt": "[1, 2, 3] sort these"}, {"prompt": "[x]"}])
    assert [p.text for p in load_prompts(path)] == ["[1, 2, 3] sort these", "[x]"]


def test_system_prompt_goes_where_a_record_has_none(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p", RECORDS)
    prompts = {p.id: p for p in load_prompts(path, system_prompt="Be brief.")}
    assert prompts["plain"].turns == (("system", "Be brief."),
                                      ("user", "what is two plus three?"))
    assert prompts["chat"].turns == WANT_TURNS["chat"]  # its own system turn is kept
    assert prompts["plain"].text == "System: Be brief.\n\nUser: what is two plus three?"


def test_prompt_field_and_trl_conversational_prompt(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p", [
        {"question": "why is the sky blue?", "answer": 7},  # a prompts file's own columns
        {"question": [{"role": "user", "content": "hi"}]}])
    got = load_prompts(path, prompt_field="question")
    assert [p.turns for p in got] == [(("user", "why is the sky blue?"),), (("user", "hi"),)]


def test_saved_dataset_reads_as_load_from_disk_does(tmp_path: Path) -> None:
    """A shuffled selection is saved in its logical order; pyarrow reads what datasets does."""
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list([{"id": i, "prompt": f"p{i}"} for i in range(40)])
    ds.shuffle(seed=0).select(range(5, 15)).save_to_disk(str(tmp_path / "d"), num_shards=3)
    want = [str(r["id"]) for r in datasets.load_from_disk(str(tmp_path / "d"))]
    assert [p.id for p in load_prompts(tmp_path / "d")] == want


def test_datasets_dict_folder(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    one = tmp_path / "one"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}])}
                         ).save_to_disk(str(one))
    assert [p.text for p in load_prompts(one)] == ["a"]
    two = tmp_path / "two"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "a"}]),
                          "test": datasets.Dataset.from_list([{"prompt": "b"}])}
                         ).save_to_disk(str(two))
    with pytest.raises(EdgePuError, match=r"splits .*train.*; name one, e\.g\. data\.prompts: "):
        load_prompts(two)
    assert [p.text for p in load_prompts(two / "test")] == ["b"]


# ---- the file teacher reads transcripts -----------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_transcript_is_a_file_teacher(fmt: str, tmp_path: Path) -> None:
    teacher_records = [r for r in RECORDS if WANT_ANSWERS[r["id"]] is not None]
    teacher = FileTeacher(TeacherConfig(kind="file",
                                        path=str(WRITERS[fmt](tmp_path / "t", teacher_records))))
    prompts = {p.id: p for p in load_prompts(write_jsonl(tmp_path / "p", RECORDS))}
    assert teacher.answer(prompts["chat"].messages()) == "apple"
    assert teacher.answer(prompts["alpaca"].messages()) == "apple pear"
    assert teacher.answer("what is two plus three?") == "five"
    # A prompt given data.system_prompt finds the record of the same conversation without it.
    sys_prompts = {p.id: p for p in load_prompts(write_jsonl(tmp_path / "p", RECORDS),
                                                 system_prompt="Be brief.")}
    assert teacher.answer(sys_prompts["plain"].messages()) == "five"


def test_teacher_record_without_an_answer_is_named(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "t", [{"prompt": "a", "anchor": "x"}, {"prompt": "b"}])
    with pytest.raises(EdgePuError, match=r"t\.csv:3 \(row 2\): no answer in this record"):
        FileTeacher(TeacherConfig(kind="file", path=str(path)))


def test_teacher_sees_the_conversation_and_its_own_system_prompt() -> None:
    p = Prompt.chat("c", WANT_TURNS["chat"])
    assert chat_messages(TeacherConfig(), p.messages()) == p.messages()
    merged = chat_messages(TeacherConfig(system_prompt="Be a good teacher."), p.messages())
    assert merged[0] == {"role": "system", "content": f"Be a good teacher.\n\n{SYSTEM}"}
    assert merged[1:] == p.messages()[1:]
    plain = chat_messages(TeacherConfig(system_prompt="T."), "hi")
    assert plain == [{"role": "system", "content": "T."}, {"role": "user", "content": "hi"}]


# ---- the student sees the chat template of each conversation, at every stage ----------------
def chatml_ids(tok: Any, turns: tuple[tuple[str, str], ...]) -> list[int]:
    """tests/tiny.py's ChatML template, written out by hand, then tokenized."""
    text = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return list(tok.encode(text + "<|im_start|>assistant\n", add_special_tokens=False))


def test_run_shows_the_student_each_conversation_through_its_template(
        tmp_path: Path, tiny_llama_dir: Path) -> None:
    """A transcript (CSV) is both the prompts and the `file` teacher; data.system_prompt fills
    the records without one. Every prompt the backend is given, for sampling, likelihood
    ranking (with and without the anchor shown in the last user turn), SFT and PU training,
    is the hand-written ChatML of that conversation."""
    from tiny import tiny_tokenizer

    from edge_pu.backends import make_backend
    from edge_pu.config import load_config
    from edge_pu.jsonl import read_jsonl
    from edge_pu.pipeline import run
    from edge_pu.rank import reference_prompt

    path = write_csv(tmp_path / "transcript", [r for r in RECORDS if r["id"] != "chat-open"])
    cfg = load_config(None, base={
        "student": {"path": str(tiny_llama_dir)},
        "teacher": {"kind": "file", "path": str(path)},
        "data": {"prompts": str(path), "system_prompt": "Be brief."},
        "sampling": {"k": 2, "max_new_tokens": 6}, "ranker": {"mode": "likelihood"},
        "sft": {"steps": 1, "batch_size": 4, "micro_batch": 2},  # every prompt once
        "train": {"algorithm": "dpo", "steps": 1, "batch_size": 1, "micro_batch": 1},
        "backend": "cpu", "run_dir": str(tmp_path / "run")})
    backend = make_backend("cpu")
    backend.load(cfg)
    seen: dict[str, set[tuple[int, ...]]] = {"sample": set(), "logprobs": set(), "train": set()}

    def spy(name: str, fn: Callable[..., Any], get: Callable[..., list[list[int]]]) -> Any:
        def wrapped(*a: Any, **kw: Any) -> Any:
            seen[name].update(tuple(p) for p in get(*a))
            return fn(*a, **kw)
        return wrapped

    backend.sample = spy("sample", backend.sample, lambda ids, *a: ids)
    backend.logprobs = spy("logprobs", backend.logprobs, lambda ids, *a: ids)
    backend.train_step = spy("train", backend.train_step,
                             lambda batches, *a: [p for b in batches for p in b.prompt_ids])
    run(cfg, backend=backend)

    tok = tiny_tokenizer()
    prompts = load_prompts(path, system_prompt="Be brief.")
    anchors = {r["id"]: r["anchor"] for r in read_jsonl(tmp_path / "run" / "anchors.jsonl")}
    assert anchors == {p.id: WANT_ANSWERS[p.id] for p in prompts}  # the transcript answered
    plain = {tuple(chatml_ids(tok, p.turns)) for p in prompts}
    shown = {tuple(chatml_ids(tok, p.turns[:-1] + (
        ("user", reference_prompt(p.last_user, anchors[p.id])),))) for p in prompts}
    assert {tuple(prompt_ids(backend, p)) for p in prompts} == plain
    assert seen["sample"] == plain
    assert seen["train"] == plain  # the SFT step and the PU pairs alike
    assert plain | shown <= seen["logprobs"] <= plain | shown
    chat = next(p for p in prompts if p.id == "chat")
    assert chat.turns[0] == ("system", SYSTEM) and len(chat.turns) == 4  # not flattened


# ---- bad records, named by file, line or row, and field, through the CLI --------------------
BAD: list[tuple[str, list[dict[str, Any]], list[str]]] = [
    ("jsonl", [{"prompt": "ok"}, {"messages": [{"role": "user", "content": "a"},
                                               {"role": "tool", "content": "b"}]}],
     ["p.jsonl:2:", 'field "messages[1]".role is \'tool\'']),
    ("json", [{"prompt": "ok"}, {"question": "where?"}],
     ["p.json:5 (row 2):", 'missing field "prompt"', "data.prompt_field: question"]),
    ("csv", [{"id": "a", "prompt": "ok"}, {"id": "b", "prompt": ""}],
     ["p.csv:3 (row 2):", 'field "prompt" is empty']),
    ("parquet", [{"messages": [{"role": "user", "content": "a"}]},
                 {"messages": [{"role": "user", "content": "a"}]},
                 {"messages": [{"role": "assistant", "content": "b"}]}],
     ["p.parquet: row 3:", 'field "messages" has no user turn']),
    ("datasets", [{"messages": [{"role": "user", "content": "a"}]},
                  {"messages": [{"role": "user", "content": "a"},
                                {"role": "assistant", "content": "b"},
                                {"role": "assistant", "content": "c"}]}],
     ["p: row 2:", 'field "messages" has 2 assistant turns after the last user turn']),
    ("csv", [{"id": "a", "prompt": "x"}, {"id": "a", "prompt": "y"}],
     ["p.csv:3 (row 2):", "duplicate id 'a'", "first on", "p.csv:2 (row 1)"]),
    ("jsonl", [{"messages": [{"role": "user", "content": "a"},
                             {"role": "system", "content": "late"}]}],
     ["p.jsonl:1:", 'field "messages[1]" is a system turn']),
    ("json", [{"instruction": ["not", "text"]}],
     ["p.json:2 (row 1):", 'field "instruction" must be a string, got list']),
]


def _cli_anchors(tmp_path: Path, prompts: Path, capsys: pytest.CaptureFixture[str]
                 ) -> tuple[int, str]:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": {"kind": "oracle"},
                                   "data": {"prompts": str(prompts)},
                                   "run_dir": str(tmp_path / "run")}))
    code = main(["anchors", str(cfg)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("fmt, records, expect", BAD,
                         ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_record_is_named_by_row_and_field(fmt: str, records: list[dict[str, Any]],
                                              expect: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = WRITERS[fmt](tmp_path / "p", records)
    code, err = _cli_anchors(tmp_path, path, capsys)
    assert code != 0 and err.startswith("edge-pu: error: ") and "Traceback" not in err
    for part in expect:
        assert part in err, f"{part!r} not in {err!r}"
    assert not (tmp_path / "run" / "anchors.jsonl").exists()


@pytest.mark.parametrize("name, content, expect", [
    ("p.json", '[{"prompt": "a"},\n {"prompt": "b"}\n {"prompt": "c"}]',
     ["p.json:3:", "invalid JSON", "expected ',' or ']'"]),
    ("p.json", '[{"prompt": "a"},\n {"prompt": }]', ["p.json:2:", "invalid JSON"]),
    ("p.json", '[{"prompt": "a"}, "text"]', ["p.json:1 (row 2):", "expected a JSON object"]),
    ("p.csv", 'prompt,id\nhello,a\n"unterminated,b\n', ["p.csv:", "not valid CSV"]),
    ("p.csv", 'prompt,id\nhello,a,extra\n', ["p.csv:2 (row 1):", "3 cells", "2 columns"]),
    ("p.csv", 'prompt,messages\n,"[{""role"": ""user"",]"\n',
     ["p.csv:2 (row 1):", 'field "messages" must be a non-empty list', "got a str",
      "holds the list as JSON"]),
    ("p.csv", b'prompt\nh\xe9llo\n', ["p.csv:2:", "not UTF-8"]),
    ("p.parquet", "not parquet at all", ["p.parquet:", "not a readable Parquet file"]),
], ids=["json-missing-comma", "json-bad-value", "json-not-object", "csv-unterminated",
        "csv-extra-cell", "csv-bad-messages-json", "csv-not-utf8", "parquet-garbage"])
def test_bad_file_is_named_by_line(name: str, content: str | bytes, expect: list[str],
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code, err = _cli_anchors(tmp_path, path, capsys)
    assert code != 0 and "Traceback" not in err
    for part in expect:
        assert part in err, f"{part!r} not in {err!r}"


def test_folder_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(EdgePuError, match=r"is a folder, but not one written by datasets' "
                                          r"save_to_disk \(no state.json\)"):
        load_prompts(tmp_path / "d")
