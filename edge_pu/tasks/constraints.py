"""Verifiable constraints of the kinds IFEval checks, in our own words, with our own checkers.

A constraint is a small dict, e.g. `{"kind": "max_words", "n": 60}`; `instruction(c)` is the
sentence a prompt carries for it and `follows(c, response)` whether a response keeps it. Pure
stdlib. The phrasing is ours and shares no 8-word run with IFEval's 541 prompts
(tests/test_constraints.py checks it against the real file); the checkers follow the same
readings as IFEval's official ones where a kind exists there (word counts on `\\w+` runs, keywords
counted as substrings and forbidden words as whole words,
bullets as lines starting "* " or "- ", JSON with optional markdown fences, `<<title>>`,
`***` paragraph dividers, `*highlights*`, `[placeholders]`), so a student that learns to keep
these constraints is measured on IFEval's prompts, which training never saw.

`reward(prompts, completions, constraints, **kwargs)` is the built-in verifier reward in TRL's
calling convention (`ranker.reward_funcs: [edge_pu.tasks.constraints:reward]`): per completion,
the share of its prompt's constraints it keeps.

Kinds, by group (a prompt draws at most one kind per group, and never two that `CONFLICTS`
says cannot both hold):
- case: lowercase, uppercase, capital_words (at least n words in capitals)
- length: max_words, min_words
- structure: bullets (exactly n), paragraphs (n, divided by a *** line), sections (n, each
  opened by "<MARKER> i"), two_answers (two different answers divided by ******), json
- wrap: quotes (the whole reply in double quotes), title (<<...>>)
- ending: end_phrase (the exact last words), postscript (a closing "P.S.")
- words: include (both words), forbid (a word absent), frequency (a word at least n times),
  letter (a letter at least n times)
- punctuation: no_commas
- markup: highlights (at least n *italic* spans), placeholders (at least n [bracketed] slots)
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

Constraint = Mapping[str, Any]

GROUPS: dict[str, tuple[str, ...]] = {
    "case": ("lowercase", "uppercase", "capital_words"),
    "length": ("max_words", "min_words"),
    "structure": ("bullets", "paragraphs", "sections", "two_answers", "json"),
    "wrap": ("quotes", "title"),
    "ending": ("end_phrase", "postscript"),
    "words": ("include", "forbid", "frequency", "letter"),
    "punctuation": ("no_commas",),
    "markup": ("highlights", "placeholders"),
}
KINDS = tuple(k for kinds in GROUPS.values() for k in kinds)
# Pairs that cannot both hold, or that make each other's check meaningless.
CONFLICTS = {frozenset(p) for p in (
    ("json", "quotes"), ("json", "title"), ("json", "end_phrase"), ("json", "postscript"),
    ("json", "highlights"), ("json", "no_commas"), ("json", "placeholders"),
    ("quotes", "end_phrase"), ("quotes", "title"), ("lowercase", "end_phrase"),
    ("uppercase", "end_phrase"), ("lowercase", "sections"), ("uppercase", "sections"),
    ("two_answers", "end_phrase"),
    ("two_answers", "quotes"), ("two_answers", "title"), ("min_words", "two_answers"),
    ("max_words", "paragraphs"), ("max_words", "sections"), ("capital_words", "json"),
)}

_WORDS = ("energy", "simple", "future", "careful", "morning", "balance", "local", "patience",
          "friendly", "quality", "weather", "practice", "honest", "window", "budget", "quiet",
          "journey", "season", "garden", "kitchen")
_PHRASES = ("Thanks for reading.", "That is all for now.", "Let me know what you think.",
            "Hope this helps you today.", "See you next time.", "Enjoy the rest of your day.")
_MARKERS = ("PART", "Section", "STEP", "Chapter")
_LETTERS = "bdgkmpwy"


def draw(kind: str, rng: random.Random) -> dict[str, Any]:
    """One constraint of `kind`, its arguments drawn from `rng`."""
    if kind in ("max_words", "min_words"):
        return {"kind": kind, "n": rng.choice((40, 50, 60, 80, 100)) if kind == "max_words"
                else rng.choice((60, 80, 100, 120))}
    if kind in ("bullets", "paragraphs", "sections"):
        c: dict[str, Any] = {"kind": kind, "n": rng.randint(2, 4)}
        if kind == "sections":
            c["marker"] = rng.choice(_MARKERS)
        return c
    if kind in ("capital_words", "highlights", "placeholders"):
        return {"kind": kind, "n": rng.randint(1, 3) if kind != "capital_words"
                else rng.randint(2, 5)}
    if kind == "include":
        return {"kind": kind, "words": rng.sample(_WORDS, 2)}
    if kind in ("forbid", "frequency"):
        c = {"kind": kind, "word": rng.choice(_WORDS if kind == "frequency" else
                                             ("very", "really", "the", "and", "good", "thing"))}
        if kind == "frequency":
            c["n"] = rng.randint(2, 4)
        return c
    if kind == "letter":
        return {"kind": kind, "letter": rng.choice(_LETTERS), "n": rng.randint(5, 10)}
    if kind == "end_phrase":
        return {"kind": kind, "phrase": rng.choice(_PHRASES)}
    return {"kind": kind}


def instruction(c: Constraint) -> str:
    """The sentence a prompt carries for constraint `c` (our phrasing, not IFEval's)."""
    k, n = c["kind"], c.get("n")
    texts = {
        "lowercase": "Keep every letter of the reply lowercase; not one capital letter anywhere.",
        "uppercase": "Type the whole reply in capital letters only.",
        "capital_words": f"Put at least {n} separate words in ALL CAPS for emphasis.",
        "max_words": f"Stay under {n} words in total.",
        "min_words": f"The reply needs {n} words or more.",
        "bullets": f"Lay it out as {n} bullet points, no more and no fewer, each line opening "
                   "with '* '.",
        "paragraphs": f"Split it into {n} paragraphs and put a line holding only *** between "
                      "neighbouring paragraphs.",
        "sections": f"Organise it into {n} parts, and open part i with the label "
                    f"'{c.get('marker')} i' on its own line.",
        "two_answers": "Offer two distinct versions, with a line of six asterisks (******) "
                       "between them and nowhere else.",
        "json": "Return the reply as one valid JSON object and nothing outside it.",
        "quotes": "Enclose the reply, from its first character to its last, in a pair of "
                  "double quotes.",
        "title": "Start with a title set inside double angle brackets, for example <<A "
                 "Fresh Start>>.",
        "end_phrase": f"Close with exactly these words: {c.get('phrase')} Nothing may come "
                      "after them.",
        "postscript": "After the main text, add a short note that begins with P.S.",
        "include": f"Work the words '{_pair(c)[0]}' and '{_pair(c)[1]}' into the reply.",
        "forbid": f"Avoid the word '{c.get('word')}' entirely.",
        "frequency": f"The word '{c.get('word')}' has to show up {n} times or more.",
        "letter": f"Let the letter '{c.get('letter')}' appear at least {n} times.",
        "no_commas": "Leave out commas completely; not a single comma.",
        "highlights": f"Mark {n} or more key phrases in markdown italics, like *this one*.",
        "placeholders": f"Leave at least {n} fill-in slots in square brackets, like [date].",
    }
    if k not in texts:
        raise ValueError(f"constraint kind {k!r} is not one of {', '.join(KINDS)}")
    return texts[k]


def _pair(c: Constraint) -> Sequence[str]:
    words = c.get("words") or ("", "")
    return words[0], words[1]


# --- checking ------------------------------------------------------------------------------

_WORD_RE = re.compile(r"\w+")
_BULLET = re.compile(r"^\s*(?:\*(?!\*)|-)\s?\S", re.MULTILINE)
_HIGHLIGHT = re.compile(r"\*[^\n*]+\*")
_PLACEHOLDER = re.compile(r"\[[^\]\n]+\]")


def _word_count(text: str) -> int:
    return len(_WORD_RE.findall(text))


def _mentions(text: str, word: str, *, whole: bool = False) -> int:
    """Occurrences of `word`, any case; as a substring ("gardens" holds "garden"), the way
    IFEval's keyword checks count, or (`whole`, its forbidden-word check) as a whole word."""
    pattern = rf"\b{re.escape(word)}\b" if whole else re.escape(word)
    return len(re.findall(pattern, text, re.IGNORECASE))


def _json_ok(text: str) -> bool:
    body = text.strip()
    body = re.sub(r"^```(?:json|JSON|Json)?\s*", "", body)
    body = re.sub(r"\s*```$", "", body).strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _sections(text: str, marker: str) -> int:
    parts = re.split(rf"\s?{re.escape(marker)}\s?\d+\s?", text)
    return len(parts) - 1


def follows(c: Constraint, response: str) -> bool:
    """Whether `response` keeps constraint `c`. An empty (blank) response keeps none."""
    text = response.strip()
    if not text:
        return False
    k, n = c["kind"], c.get("n", 0)
    if k == "lowercase":
        return text == text.lower()
    if k == "uppercase":
        return text == text.upper()
    if k == "capital_words":
        return sum(w.isupper() and len(w) > 1 for w in _WORD_RE.findall(text)) >= n
    if k == "max_words":
        return _word_count(text) < n
    if k == "min_words":
        return _word_count(text) >= n
    if k == "bullets":
        return len(_BULLET.findall(text)) == n
    if k == "paragraphs":
        chunks = re.split(r"\s?\*\*\*\s?", text)
        return len(chunks) == n and all(ch.strip() for ch in chunks)
    if k == "sections":
        return _sections(text, str(c.get("marker"))) == n
    if k == "two_answers":
        parts = [p.strip() for p in text.split("******")]
        return len(parts) == 2 and all(parts) and parts[0] != parts[1]
    if k == "json":
        return _json_ok(text)
    if k == "quotes":
        return len(text) > 1 and text[0] == '"' and text[-1] == '"'
    if k == "title":
        return re.search(r"<<[^\n]+>>", text) is not None
    if k == "end_phrase":
        return text.endswith(str(c.get("phrase")).strip())
    if k == "postscript":
        return re.search(r"\s*p\.\s?s\..*$", text.lower(), re.MULTILINE) is not None
    if k == "include":
        return all(_mentions(text, w) for w in _pair(c))
    if k == "forbid":
        return _mentions(text, str(c.get("word")), whole=True) == 0
    if k == "frequency":
        return _mentions(text, str(c.get("word"))) >= n
    if k == "letter":
        return text.lower().count(str(c.get("letter"))) >= n
    if k == "no_commas":
        return "," not in text
    if k == "highlights":
        return len([h for h in _HIGHLIGHT.findall(text) if h.strip("* ")]) >= n
    if k == "placeholders":
        return len(_PLACEHOLDER.findall(text)) >= n
    raise ValueError(f"constraint kind {k!r} is not one of {', '.join(KINDS)}")


def share_kept(constraints: Sequence[Constraint], response: str) -> float:
    """The share of `constraints` that `response` keeps, in [0, 1]."""
    if not constraints:
        raise ValueError("share_kept: a prompt of this workload carries at least one constraint")
    return sum(follows(c, response) for c in constraints) / len(constraints)


def pick(rng: random.Random, count: int) -> list[dict[str, Any]]:
    """`count` constraints from distinct groups, no two in CONFLICTS."""
    groups = list(GROUPS)
    rng.shuffle(groups)
    chosen: list[dict[str, Any]] = []
    for g in groups:
        kind = rng.choice(GROUPS[g])
        if any(frozenset((kind, c["kind"])) in CONFLICTS for c in chosen):
            continue
        chosen.append(draw(kind, rng))
        if len(chosen) == count:
            break
    return chosen


def _completion_text(completion: Any) -> str:
    """TRL passes a completion as a string, or (conversational) as a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    raise TypeError(f"a completion must be a string or a list of messages, got "
                    f"{type(completion).__name__}")


def reward(prompts: Sequence[Any], completions: Sequence[Any],
           constraints: Sequence[Sequence[Constraint]] | None = None,
           **kwargs: Any) -> list[float]:
    """The workload's verifier in TRL's reward-function convention: one float per completion,
    the share of its prompt's constraints it keeps. `constraints` is the prompts file's column
    of that name, one list per completion (as TRL passes dataset columns)."""
    if constraints is None:
        raise ValueError("needs the prompts' 'constraints' column (each row's list of "
                         "constraints); the workload's prompts files carry it")
    return [share_kept(cs, _completion_text(comp))
            for comp, cs in zip(completions, constraints, strict=True)]
