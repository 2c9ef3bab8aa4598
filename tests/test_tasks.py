"""Tests of the built-in task suite (edge_pu.tasks): generation, oracle, checkers, split, jsonl.

Run: python -m pytest tests/test_tasks.py -q
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from edge_pu.tasks import (
    FAMILIES,
    OracleIndex,
    Task,
    check,
    from_jsonl_row,
    generate_tasks,
    oracle_answer,
    passed,
    split,
    to_jsonl_rows,
)


def _task(family: str, **spec: object) -> Task:
    return Task(f"{family}-9999", family, "(hand-written)", "", spec)


def _by_family(tasks: list[Task]) -> dict[str, list[Task]]:
    groups: dict[str, list[Task]] = {}
    for t in tasks:
        groups.setdefault(t.family, []).append(t)
    return groups


# --- generation -------------------------------------------------------------------------------


def test_suite_size_families_and_ids() -> None:
    tasks = generate_tasks(450, seed=0)
    counts = Counter(t.family for t in tasks)
    assert len(FAMILIES) >= 8 and len(tasks) == 450
    assert set(counts) == set(FAMILIES) and min(counts.values()) == 450 // len(FAMILIES)
    assert len({t.id for t in tasks}) == len(tasks) and len({t.prompt for t in tasks}) == len(tasks)
    assert [t.family for t in tasks[: len(FAMILIES)]] == list(FAMILIES)  # round-robin
    assert tasks[len(FAMILIES)].id == f"{next(iter(FAMILIES))}-0001"


def test_same_seed_same_tasks_and_seeds_differ() -> None:
    a, b, c = generate_tasks(450, seed=7), generate_tasks(450, seed=7), generate_tasks(450, seed=8)
    assert a == b
    assert [t.id for t in a] == [t.id for t in c]  # ids are family + index, whatever the seed
    assert sum(x.prompt != y.prompt for x, y in zip(a, c, strict=True)) > 400


def test_a_family_does_not_depend_on_n_or_on_other_families() -> None:
    small, big = _by_family(generate_tasks(90, seed=3)), _by_family(generate_tasks(450, seed=3))
    for family, tasks in small.items():
        assert big[family][: len(tasks)] == tasks
    only = generate_tasks(20, seed=3, families=["json_key", "arith"])
    assert [t.family for t in only[:2]] == ["json_key", "arith"]
    assert _by_family(only)["arith"] == big["arith"][:10]


def test_generation_does_not_depend_on_the_hash_seed() -> None:
    """Sets iterate in a hash-seed-dependent order; the suite must not inherit it."""
    code = "from edge_pu.tasks import generate_tasks as g, to_jsonl_rows as r; print(r(g(450)))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout
        for hash_seed in ("1", "2")
    }
    assert len(outs) == 1


def test_prompts_and_answers_are_short() -> None:
    """Sampling stays cheap on a CPU: answers <= 24 words/symbols (a rough token count)."""
    for t in generate_tasks(450, seed=0):
        assert len(t.prompt) <= 160, t.prompt
        assert len(t.answer.split()) <= 24 and len(t.answer) <= 80, t.answer


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown"):
        generate_tasks(10, families=["arith", "poetry"])
    with pytest.raises(ValueError, match="distinct"):
        generate_tasks(10, families=["arith", "arith"])
    with pytest.raises(ValueError, match="n=-1"):
        generate_tasks(-1)
    with pytest.raises(ValueError, match="ran out of distinct prompts"):
        generate_tasks(1000, families=["word_count"])  # 20 topics x 6 lengths x 2 phrasings
    with pytest.raises(KeyError, match="unknown family"):
        check(Task("x-0", "poetry", "p", "a", {}), "a")


def test_importing_the_suite_pulls_no_heavy_framework() -> None:
    code = "import sys, edge_pu.tasks; print(sorted({'numpy', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- oracle and checkers over the whole suite -------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_every_oracle_answer_scores_one(seed: int) -> None:
    tasks = generate_tasks(900, seed=seed)
    bad = [(t.id, t.answer) for t in tasks if check(t, t.answer) != 1.0 or not passed(t, t.answer)]
    assert bad == []


def test_answers_of_other_tasks_rarely_pass_and_stay_in_range() -> None:
    """Junk check: another task's oracle answer (same family, so the right shape) must not pass
    unless it happens to satisfy this spec too (same number, word, topic...): < 5% per family."""
    rng = random.Random(0)
    for family, tasks in _by_family(generate_tasks(900, seed=2)).items():
        others = rng.sample(tasks, len(tasks))
        qualities = [check(t, o.answer) for t, o in zip(tasks, others, strict=True)]
        assert all(0.0 <= q <= 1.0 for q in qualities)
        wrong_passes = sum(q == 1.0 and t.answer != o.answer
                           for q, t, o in zip(qualities, tasks, others, strict=True))
        assert wrong_passes <= 0.05 * len(tasks), family
        # "I don't know." is 3 words, so an off-topic reply to "exactly 3 words": 1 x 0.5
        assert all(check(t, junk) <= 0.5 for t in tasks for junk in ("", "I don't know.", "?"))


# --- partial credit, family by family: the expected value follows each checker's formula -------


def _expect(task: Task, cases: dict[str, float]) -> None:
    got = {response: check(task, response) for response in cases}
    assert got == pytest.approx(cases)


def test_arith_partial_credit() -> None:
    """Only the number -> 1.0 (label, bold, trailing period and ".0" tolerated); the right
    number ending a longer reply -> 0.5; a wrong number, or the right one not last -> 0.0."""
    _expect(_task("arith", value=42), {
        "42": 1.0, " Answer: 42. ": 1.0, "**42**": 1.0, "42.0": 1.0,
        "17 + 25 = 42": 0.5, "The answer is 42.": 0.5,
        "41": 0.0, "42 is wrong, it is 41": 0.0, "": 0.0,
    })


def test_uppercase_partial_credit() -> None:
    """case x alone: "Apple" = 0.5 (case) x 1 = 0.5; "Sure: APPLE" = 1 x 0.5 (not alone) = 0.5;
    "sure, apple" = 0.5 x 0.5 = 0.25; "APPLES" is another word -> 0.0."""
    _expect(_task("uppercase", word="APPLE"), {
        "APPLE": 1.0, '"APPLE".': 1.0, "Apple": 0.5, "Sure: APPLE": 0.5, "sure, apple": 0.25,
        "BANANA": 0.0, "APPLES": 0.0,
    })


def test_word_count_partial_credit() -> None:
    """n = 5: count = 1 - 0.25 |words - 5|, x0.5 without the topic. 4 or 6 words -> 0.75;
    5 words about dogs -> 1 x 0.5 = 0.5; 2 words -> 0.25; 8 words -> 0.25; 9 words -> 0.0."""
    _expect(_task("word_count", n=5, topic=["cat", "cats"]), {
        "Cats sleep all day long.": 1.0,
        "The cat's toy is red.": 1.0,
        "Cats sleep all day.": 0.75,
        "My cat sleeps all day long.": 0.75,
        "Dogs sleep all day long.": 0.5,
        "Cats sleep.": 0.25,
        "Cats, honestly, sleep through almost every single day.": 0.25,
        "Cats are lovely animals that sleep all day long": 0.0,
    })


def test_starts_with_partial_credit() -> None:
    """first x length x topic: lower-case first word 0.75; the word later 0.25; "Today." =
    1 x 0.5 (1 word) x 0.5 (no dog) = 0.25; "Today it rained." = 1 x 1 x 0.5 = 0.5."""
    _expect(_task("starts_with", word="Today", topic=["dog", "dogs"]), {
        "Today the dogs played outside.": 1.0,
        '"Today dogs run."': 1.0,
        "today the dogs played outside.": 0.75,
        "The dogs played outside today.": 0.25,
        "Today.": 0.25,
        "Today it rained.": 0.5,
        "Dogs are great.": 0.0,
    })


def test_keyword_partial_credit() -> None:
    """found x length x topic: "calmly" holds "calm" only inside a word -> 0.5; "Calm!" =
    1 x 0.5 (1 word) x 0.5 (no dog) = 0.25; keyword absent -> 0.0."""
    _expect(_task("keyword", keyword="calm", topic=["dog", "dogs"]), {
        "Dogs are always calm.": 1.0, "CALM dogs bark.": 1.0, "My dog is calm": 1.0,
        "Dogs wag their tails calmly.": 0.5, "Calm!": 0.25, "Dogs are loud.": 0.0,
    })


def test_bullets_partial_credit() -> None:
    """count x content x style x extra with n = 3: preamble -> 0.75; "*" or "1." bullets -> 0.5;
    2 items -> 0.75 x 2/3 = 0.5; 4 items -> 0.75 x 1 = 0.75; the same item 3 times -> 1/3;
    one item not a fruit -> 2/3; an item with a description -> 0.75; no list -> 0.0."""
    _expect(_task("bullets", n=3, category="fruits", items=None), {
        "- apple\n- banana\n- cherry": 1.0,
        "- Apples\n- Bananas\n- Cherries": 1.0,
        "Here are three fruits:\n- apple\n- banana\n- cherry": 0.75,
        "* apple\n* banana\n* cherry": 0.5,
        "1. apple\n2. banana\n3. cherry": 0.5,
        "- apple\n- banana": 0.5,
        "- apple\n- banana\n- cherry\n- grape": 0.75,
        "- apple\n- apple\n- apples": 1 / 3,
        "- apple\n- car\n- cherry": 2 / 3,
        "- **Apple**: red and sweet\n- banana\n- cherry": 0.75,
        "apple, banana, cherry": 0.0,
    })
    # Given items: a valid color that was not given does not count.
    _expect(_task("bullets", n=3, category="colors", items=["red", "blue", "green"]), {
        "- red\n- blue\n- green": 1.0, "- red\n- blue\n- yellow": 2 / 3,
    })


def test_json_key_partial_credit() -> None:
    """value x only_key x clean: case-different value 0.75; other value 0.5; key missing 0.25
    (whatever keys there are instead); an extra key 0.75; text around the object 0.75; wrong
    value, extra key and text around it: 0.5 x 0.75 x 0.75 = 0.28125; not an object -> 0.0."""
    _expect(_task("json_key", key="city", value="Paris"), {
        '{"city": "Paris"}': 1.0,
        '```json\n{\n  "city": "Paris"\n}\n```': 1.0,
        '{"city": "paris"}': 0.75,
        '{"city": "London"}': 0.5,
        '{"town": "Paris"}': 0.25,
        '{"city": "Paris", "country": "France"}': 0.75,
        'Sure! {"city": "Paris"}': 0.75,
        'Sure! {"city": "london", "x": 1} Done.': 0.5 * 0.75 * 0.75,
        "city: Paris": 0.0, '["Paris"]': 0.0, "{'city': 'Paris'}": 0.0,
    })
    # A number given as text is equal only as text; true == 1 in Python, but not here.
    _expect(_task("json_key", key="count", value=1), {
        '{"count": 1}': 1.0, '{"count": "1"}': 0.75, '{"count": true}': 0.5,
    })


def test_extract_name_partial_credit() -> None:
    """Just the name -> 1.0 (any case); the name in a sentence without the other name -> 0.5;
    the other name, or both names (a copy of the passage) -> 0.0."""
    _expect(_task("extract_name", name="Maria", other="Tom"), {
        "Maria": 1.0, "maria.": 1.0, "Answer: **Maria**": 1.0,
        "Maria gave the book.": 0.5, "It was Maria.": 0.5, "Maria's": 0.5,
        "Tom": 0.0, "Maria gave a book to Tom.": 0.0, "I don't know": 0.0,
    })


def test_sort_numbers_partial_credit() -> None:
    """Asked order as a comma list -> 1.0, in another shape -> 0.75; same numbers otherwise ->
    0.5 x (pairs in order) / 3: "42, 7, 19" has only (7, 19) in order -> 1/6; "7, 42, 19" has
    (7, 42), (7, 19) -> 1/3; reversed -> 0.0; missing or other numbers -> 0.0."""
    _expect(_task("sort_numbers", numbers=[42, 7, 19], descending=False), {
        "7, 19, 42": 1.0, "[7, 19, 42]": 1.0, "7,19,42.": 1.0,
        "The sorted numbers are 7, 19, 42.": 0.75, "7\n19\n42": 0.75, "1. 7\n2. 19\n3. 42": 0.75,
        "42, 7, 19": 1 / 6, "7, 42, 19": 1 / 3, "42, 19, 7": 0.0, "7, 19": 0.0, "7, 19, 43": 0.0,
    })
    _expect(_task("sort_numbers", numbers=[42, 7, 19], descending=True), {
        "42, 19, 7": 1.0, "7, 19, 42": 0.0,
    })


# --- split, oracle index, jsonl ---------------------------------------------------------------


def test_split_is_disjoint_stratified_and_deterministic() -> None:
    tasks = generate_tasks(450, seed=0)
    train, heldout = split(tasks, heldout_fraction=0.2, seed=1)
    assert {t.id for t in train}.isdisjoint(t.id for t in heldout)
    assert len(train) + len(heldout) == len(tasks)
    assert Counter(t.family for t in heldout) == {f: 10 for f in FAMILIES}  # 50 x 0.2 each
    assert split(list(reversed(tasks)), heldout_fraction=0.2, seed=1)[1] == heldout[::-1]
    assert split(tasks, heldout_fraction=0.2, seed=2)[1] != heldout
    assert split(tasks, heldout_fraction=0.0, seed=1) == (tasks, [])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split(tasks, heldout_fraction=1.0, seed=1)
    with pytest.raises(ValueError, match="unique"):
        split(tasks + tasks[:1], heldout_fraction=0.2, seed=1)


def test_oracle_index_looks_up_prompts() -> None:
    tasks = generate_tasks(45, seed=0)
    index = OracleIndex(tasks)
    assert len(index) == 45 and all(index[t.prompt] == t.answer for t in tasks)
    assert index["  " + tasks[0].prompt.replace(" ", "\n ", 1)] == tasks[0].answer
    assert oracle_answer(tasks[3].prompt, tasks) == tasks[3].answer
    with pytest.raises(KeyError, match="no oracle answer for prompt 'What is the capital"):
        index["What is the capital of France?"]
    with pytest.raises(ValueError, match="another answer"):
        OracleIndex([tasks[0], Task("x-0", "arith", tasks[0].prompt, "other", {})])


def test_jsonl_round_trip() -> None:
    tasks = generate_tasks(90, seed=4)
    lines = [json.dumps(row) for row in to_jsonl_rows(tasks)]
    back = [from_jsonl_row(json.loads(line)) for line in lines]
    assert back == tasks
    assert set(json.loads(lines[0])) == {"id", "prompt", "family", "answer", "spec"}
    assert all(check(t, t.answer) == 1.0 for t in back)
    row = json.loads(lines[0])
    with pytest.raises(ValueError, match="'prompt' must be a string"):
        from_jsonl_row({**row, "prompt": None})
    with pytest.raises(ValueError, match="unknown family 'poetry'"):
        from_jsonl_row({**row, "family": "poetry"})
    with pytest.raises(ValueError, match="'spec' must be an object"):
        from_jsonl_row({k: v for k, v in row.items() if k != "spec"})
