"""Rank and text-similarity metrics for the evaluation suite and the `similarity` baseline ranker.

- `kendall_tau(a, b)`: Kendall tau-b between two score lists over the same items, e.g. a
  ranker's scores against the checker's true quality (METHOD.md, "What must be measured").
- `chrf(hypothesis, reference)`: character n-gram F-score (Popovic 2015), in [0, 1]; the
  `similarity` ranker scores a candidate by its chrF against the teacher's anchor.

Pure Python and O(n^2) for Kendall tau: groups hold a handful of candidates.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall tau-b: (C - D) / sqrt((n0 - n1) (n0 - n2)), in [-1, 1].

    Over the n0 = n(n-1)/2 pairs of items, C counts pairs ordered the same way in a and b, D
    pairs ordered oppositely; n1 and n2 count pairs tied in a and in b (a pair tied in both
    counts in both). Returns 0.0 when either side is constant (or n < 2): the correlation is
    undefined there, and "no information about the order" is what 0.0 means downstream.
    """
    if len(a) != len(b):
        raise ValueError(f"kendall_tau needs equal lengths, got {len(a)} and {len(b)}")
    xs, ys = [float(v) for v in a], [float(v) for v in b]
    if any(math.isnan(v) for v in xs + ys):
        raise ValueError("kendall_tau got a NaN score: rank only finite scores")
    n = len(xs)
    concordant = discordant = tied_a = tied_b = 0
    for i in range(n):
        for j in range(i + 1, n):
            da, db = xs[i] - xs[j], ys[i] - ys[j]
            tied_a += da == 0
            tied_b += db == 0
            if da * db > 0:
                concordant += 1
            elif da * db < 0:
                discordant += 1
    n0 = n * (n - 1) // 2
    denom = math.sqrt((n0 - tied_a) * (n0 - tied_b))
    return (concordant - discordant) / denom if denom > 0 else 0.0


def _char_ngrams(text: str, n: int) -> Counter[str]:
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str, *, n: int = 6, beta: float = 2.0) -> float:
    """Character n-gram F-beta score of `hypothesis` against `reference`, in [0, 1].

    Standard chrF (as sacrebleu's default, divided by 100): whitespace is removed; for each
    order k = 1..n, precision_k = matched k-grams / hypothesis k-grams and recall_k = matched
    k-grams / reference k-grams (matches clipped by counts); chrP and chrR average them over the
    orders where both strings have at least one k-gram; then
    chrF = (1 + beta^2) chrP chrR / (beta^2 chrP + chrR). beta = 2 weighs recall twice as much.
    Returns 0.0 when either string has no non-whitespace character.
    """
    if n < 1:
        raise ValueError(f"chrf n-gram order is {n}: it must be >= 1")
    if not beta > 0:
        raise ValueError(f"chrf beta is {beta}: it must be > 0")
    hyp = "".join(hypothesis.split())
    ref = "".join(reference.split())
    precisions: list[float] = []
    recalls: list[float] = []
    for k in range(1, n + 1):
        hyp_grams, ref_grams = _char_ngrams(hyp, k), _char_ngrams(ref, k)
        hyp_total, ref_total = sum(hyp_grams.values()), sum(ref_grams.values())
        if hyp_total == 0 or ref_total == 0:
            continue  # the string is shorter than k: this order carries no evidence
        matched = sum((hyp_grams & ref_grams).values())
        precisions.append(matched / hyp_total)
        recalls.append(matched / ref_total)
    if not precisions:
        return 0.0
    chr_p = sum(precisions) / len(precisions)
    chr_r = sum(recalls) / len(recalls)
    if chr_p + chr_r == 0:
        return 0.0
    b2 = beta * beta
    return (1 + b2) * chr_p * chr_r / (b2 * chr_p + chr_r)


def _word_ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(hypothesis: str, reference: str, *, max_n: int = 4) -> float:
    """Sentence BLEU of `hypothesis` against one `reference`, in [0, 1] (BLEUBERI's reward,
    arXiv 2505.11080, uses BLEU against a strong reference the same way).

    Whitespace tokens; modified n-gram precisions p_n (clipped counts) for n = 1..max_n with
    add-one smoothing for n > 1 (Lin & Och 2004: (m + 1) / (c + 1)), their geometric mean,
    times the brevity penalty BP = exp(1 - r / c) when the hypothesis (c words) is shorter
    than the reference (r words), else 1. 0.0 when either side has no word, or no unigram
    matches.
    """
    hyp, ref = hypothesis.split(), reference.split()
    if not hyp or not ref:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        h, r = _word_ngrams(hyp, n), _word_ngrams(ref, n)
        total = sum(h.values())
        matched = sum((h & r).values())
        if n == 1:
            if matched == 0:
                return 0.0
            logs.append(math.log(matched / total))
        else:
            logs.append(math.log((matched + 1) / (total + 1)))
    bp = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(sum(logs) / max_n)
