"""Task families of the built-in suite, part 1: the types, the response reader, free-text formats.

A family is a `Family`: a name, `make(rng, index) -> Task`, which draws one prompt with its oracle
answer and a JSON-serialisable `spec`, and `check(spec, response) -> float`, which scores a
student's response in [0, 1] (1.0 = what a perfect teacher would say). Pure stdlib: `make` draws
only from the `random.Random` it is given.

How every checker reads a response (`clean`, `clean_token`):
- surrounding whitespace is stripped and one leading "Answer:" / "Final answer:" label is dropped:
  chat models add it often and it carries no content, so it costs nothing;
- answers that are one token (a number, a word, a name) also tolerate wrapping quotes, backticks
  or markdown bold and one trailing "." or "!";
- anything else counts: extra words, a preamble or a wrong bullet style cost the partial credit
  each checker documents, so junk does not pass.

Families here: arith, uppercase, word_count, starts_with, keyword. Part 2 (`structured.py`):
bullets, json_key, extract_name, sort_numbers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Task:
    """One checkable prompt. `spec` is what the family's checker needs; treat it as read-only."""

    id: str  # family + index, e.g. "arith-0007"; unique across a generated suite
    family: str
    prompt: str  # the user instruction, plain text (the chat template is applied elsewhere)
    answer: str  # the oracle's answer: its checker scores it 1.0
    spec: Mapping[str, Any] = field(hash=False)


MakeFn = Callable[[random.Random, int], Task]
CheckFn = Callable[[Mapping[str, Any], str], float]


@dataclass(frozen=True)
class Family:
    """A task family; the suite's FAMILIES registry maps its name to it."""

    name: str
    description: str
    make: MakeFn  # (rng, index) -> Task; draws only from rng
    check: CheckFn  # (spec, response) -> quality in [0, 1]


def task_id(family: str, index: int) -> str:
    return f"{family}-{index:04d}"


# --- reading responses ------------------------------------------------------------------------

_LABEL = re.compile(r"^(?:final\s+answer|answer)\s*[:\-]\s*", re.IGNORECASE)
_WRAP = "\"'`*“”‘’ \t"
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")


def clean(response: str) -> str:
    """Strip whitespace and one leading "Answer:" label."""
    return _LABEL.sub("", response.strip(), count=1).strip()


def clean_token(response: str) -> str:
    """`clean`, then drop wrapping quotes/backticks/bold and one trailing "." or "!"."""
    text = clean(response).strip(_WRAP)
    if text[-1:] in (".", "!"):
        text = text[:-1]
    return text.strip(_WRAP)


def words(text: str) -> list[str]:
    """Words as a reader counts them: "don't" and "well-known" are one word, numbers count."""
    return _WORD.findall(text)


def mentions(toks: list[str], forms: list[str]) -> bool:
    """Whether any word is one of `forms` (singular, plural), possessives included."""
    wanted = {f.lower() for f in forms}
    return any(t.lower().removesuffix("'s").removesuffix("’s") in wanted for t in toks)


# --- word lists (small, embedded: the suite needs no data files) -------------------------------

NAMES = (
    "Maria Tom Anna David Sara James Lucy Omar Elena Peter Nina Carlos Emma Hassan Julia Kevin "
    "Laura Olga Paul Rosa Sam Tina Victor Wendy Yusuf Zoe Ben Chloe Daniel Henry Irene Jack Leo "
    "Mia Noah Priya Raj Aisha Felix Hannah"
).split()
CITIES = (
    "Paris London Tokyo Berlin Madrid Rome Cairo Lima Oslo Dublin Vienna Prague Lisbon Athens "
    "Toronto Sydney Seoul Delhi Nairobi Boston Chicago Denver Warsaw Havana Quito Manila Bangkok "
    "Hanoi Istanbul Lagos"
).split()
# Topics for "write a sentence about ..." prompts: (singular, plural), all regular plurals.
TOPICS = [
    (s, s + "s")
    for s in (
        "cat dog horse rabbit bird duck goat cow parrot book tree river mountain train flower "
        "cloud bicycle star garden apple"
    ).split()
]
OBJECTS = (
    "table window garden pencil mountain river candle rocket guitar planet bridge castle jacket "
    "ladder mirror pillow basket button camera island forest blanket kettle lantern wallet "
    "helmet violin tunnel harbor meadow orange banana lemon cherry tiger zebra monkey turtle "
    "penguin dolphin spoon bottle rainbow pocket desert valley ocean winter summer market "
    "letter doctor teacher kitchen school friend morning picture hammer needle engine pepper "
    "carrot potato onion silver purple yellow"
).split()


# --- arith: a single number ---------------------------------------------------------------------

_ARITH_PROMPTS = (
    "What is {expr}? Reply with only the number.",
    "Compute {expr}. Answer with a single number.",
    "Calculate {expr} and give just the result as a number.",
)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _make_arith(rng: random.Random, index: int) -> Task:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        value = a + b
    elif op == "-":
        a = rng.randint(10, 99)
        b = rng.randint(1, a)
        value = a - b
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        value = a * b
    prompt = rng.choice(_ARITH_PROMPTS).format(expr=f"{a} {op} {b}")
    return Task(task_id("arith", index), "arith", prompt, str(value), {"value": value})


def _check_arith(spec: Mapping[str, Any], response: str) -> float:
    """1.0: only the right number ("42", "42.", "42.0"); 0.5: the right number ends a longer
    reply ("17 + 25 = 42", "The answer is 42."); 0.0: otherwise (a wrong number gets nothing)."""
    text = clean_token(response)
    value = float(spec["value"])
    if _NUMBER.fullmatch(text):
        return 1.0 if float(text) == value else 0.0
    numbers = _NUMBER.findall(text)
    return 0.5 if numbers and float(numbers[-1]) == value else 0.0


# --- uppercase: one word in capitals ------------------------------------------------------------

# Sorted: a set's order changes with PYTHONHASHSEED and would break determinism.
_UPPER_WORDS = sorted(set(OBJECTS) | {singular for singular, _ in TOPICS})
_UPPER_PROMPTS = (
    'Write the word "{w}" in capital letters. Reply with that one word only.',
    'Convert "{w}" to uppercase and output only the result.',
    'Spell "{w}" in all capital letters. Write nothing else.',
)


def _make_uppercase(rng: random.Random, index: int) -> Task:
    word = rng.choice(_UPPER_WORDS)
    prompt = rng.choice(_UPPER_PROMPTS).format(w=word)
    return Task(task_id("uppercase", index), "uppercase", prompt, word.upper(),
                {"word": word.upper()})


def _check_uppercase(spec: Mapping[str, Any], response: str) -> float:
    """case x alone: case 1.0 if the word appears in capitals, 0.5 if only in another case
    (0.0 if absent); alone 1.0 if it is the whole reply, else 0.5.
    "APPLE" -> 1.0, "Apple" -> 0.5, "Sure: APPLE" -> 0.5, "sure, apple" -> 0.25."""
    text = clean_token(response)
    target = str(spec["word"])
    toks = words(text)
    if target in toks:
        case = 1.0
    elif target.lower() in (t.lower() for t in toks):
        case = 0.5
    else:
        return 0.0
    alone = 1.0 if len(toks) == 1 and text == toks[0] else 0.5
    return case * alone


# --- word_count: exactly N words ----------------------------------------------------------------

_COUNT_PROMPTS = (
    "Write one sentence about {p} using exactly {n} words.",
    "Describe {p} in one sentence of exactly {n} words.",
)
_COUNT_ORACLE = {
    3: "{P} are wonderful.",
    4: "I really like {p}.",
    5: "Many people really like {p}.",
    6: "Many people around here like {p}.",
    7: "Many people around the world like {p}.",
    8: "Many people around the world really like {p}.",
}


def _make_word_count(rng: random.Random, index: int) -> Task:
    singular, plural = rng.choice(TOPICS)
    n = rng.choice(sorted(_COUNT_ORACLE))
    prompt = rng.choice(_COUNT_PROMPTS).format(p=plural, n=n)
    answer = _COUNT_ORACLE[n].format(p=plural, P=plural.capitalize())
    return Task(task_id("word_count", index), "word_count", prompt, answer,
                {"n": n, "topic": [singular, plural]})


def _check_word_count(spec: Mapping[str, Any], response: str) -> float:
    """count x topic: count = max(0, 1 - 0.25 * |words - n|) (off by one -> 0.75, by four -> 0);
    topic 1.0 if the topic word (singular or plural) appears, else 0.5."""
    toks = words(clean(response))
    count = max(0.0, 1.0 - 0.25 * abs(len(toks) - int(spec["n"])))
    topic = 1.0 if mentions(toks, list(spec["topic"])) else 0.5
    return count * topic


# --- starts_with: first word given --------------------------------------------------------------

_START_PROMPTS = (
    'Write a short sentence about {p} that starts with the word "{w}".',
    'Write one sentence about {p}. The first word must be "{w}".',
)
_START_ORACLE = {
    "Today": "Today the {p} look lovely.",
    "Every": "Every child enjoys {p}.",
    "Yesterday": "Yesterday I saw some {p}.",
    "Sometimes": "Sometimes {p} make me smile.",
    "My": "My family loves {p}.",
    "Many": "Many people enjoy {p}.",
    "Most": "Most {p} are beautiful.",
    "Some": "Some {p} are very old.",
    "Everyone": "Everyone likes {p}.",
    "Usually": "Usually {p} are easy to find.",
    "Honestly": "Honestly, {p} are wonderful.",
    "Our": "Our town has many {p}.",
}


def _make_starts_with(rng: random.Random, index: int) -> Task:
    singular, plural = rng.choice(TOPICS)
    word = rng.choice(sorted(_START_ORACLE))
    prompt = rng.choice(_START_PROMPTS).format(p=plural, w=word)
    return Task(task_id("starts_with", index), "starts_with", prompt,
                _START_ORACLE[word].format(p=plural), {"word": word, "topic": [singular, plural]})


def _sentence_factors(toks: list[str], spec: Mapping[str, Any]) -> float:
    """Shared by the sentence families: length 1.0 for 3-25 words else 0.5, times topic 1.0 if
    the topic word appears else 0.5."""
    length = 1.0 if 3 <= len(toks) <= 25 else 0.5
    return length * (1.0 if mentions(toks, list(spec["topic"])) else 0.5)


def _check_starts_with(spec: Mapping[str, Any], response: str) -> float:
    """first x length x topic: first 1.0 if the first word is the given one, 0.75 if it is in
    another case ("today"), 0.25 if the word comes later, 0.0 if absent; length and topic as in
    `_sentence_factors`."""
    toks = words(clean(response))
    word = str(spec["word"])
    if not toks:
        return 0.0
    if toks[0] == word:
        first = 1.0
    elif toks[0].lower() == word.lower():
        first = 0.75
    elif word.lower() in (t.lower() for t in toks):
        first = 0.25
    else:
        return 0.0
    return first * _sentence_factors(toks, spec)


# --- keyword: include a given word --------------------------------------------------------------

_KEYWORD_PROMPTS = (
    'Write a short sentence about {p} that uses the word "{k}".',
    'Write one sentence about {p} containing the word "{k}".',
)
_KEYWORD_ORACLE = ("{P} can be very {k}.", "I think {p} are {k}.", "Some {p} are surprisingly {k}.")
ADJECTIVES = (
    "happy quiet bright gentle curious tiny famous colorful lovely strong calm clever busy "
    "friendly beautiful noisy ancient peaceful"
).split()


def _make_keyword(rng: random.Random, index: int) -> Task:
    singular, plural = rng.choice(TOPICS)
    keyword = rng.choice(ADJECTIVES)
    prompt = rng.choice(_KEYWORD_PROMPTS).format(p=plural, k=keyword)
    answer = rng.choice(_KEYWORD_ORACLE).format(p=plural, P=plural.capitalize(), k=keyword)
    return Task(task_id("keyword", index), "keyword", prompt, answer,
                {"keyword": keyword, "topic": [singular, plural]})


def _check_keyword(spec: Mapping[str, Any], response: str) -> float:
    """found x length x topic: found 1.0 if the keyword is a word of the reply (any case), 0.5 if
    only inside another word ("happily" for "happy"), else 0.0; length and topic as in
    `_sentence_factors`."""
    text = clean(response)
    toks = words(text)
    keyword = str(spec["keyword"]).lower()
    if keyword in (t.lower() for t in toks):
        found = 1.0
    elif keyword in text.lower():
        found = 0.5
    else:
        return 0.0
    return found * _sentence_factors(toks, spec)


TEXT_FAMILIES: tuple[Family, ...] = (
    Family("arith", "a single number: + - * on small integers", _make_arith, _check_arith),
    Family("uppercase", "one given word in capitals", _make_uppercase, _check_uppercase),
    Family("word_count", "a sentence of exactly N words", _make_word_count, _check_word_count),
    Family("starts_with", "a sentence that starts with a given word", _make_starts_with,
           _check_starts_with),
    Family("keyword", "a sentence that includes a given word", _make_keyword, _check_keyword),
)
