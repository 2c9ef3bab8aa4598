"""Self-ranking scores -> training signal: preference pairs (DPO) or a label distribution (GRPO).

Input: the scores s_1..s_K a ranker gave one prompt's K candidates (higher is better).
Output: `make_pairs` -> (winner_index, loser_index) pairs with s_w - s_l > margin;
`listwise_target` -> d = softmax(s / tau), a distribution over the K candidates.
Prompts whose candidates all tie (`is_tied`) yield no pair and a uniform target; the pipeline
counts and reports them (METHOD.md, "Our design for each step").

Pure Python: no torch, no numpy, so the ranking maths can be checked anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Pair = tuple[int, int]


def _check_scores(scores: Sequence[float]) -> list[float]:
    values = [float(s) for s in scores]
    for i, s in enumerate(values):
        if not math.isfinite(s):
            raise ValueError(
                f"score {i} is {s}: the ranker must return a finite score for every candidate"
            )
    return values


def _best_worst(scores: list[float], margin: float) -> list[Pair]:
    """One pair per prompt: (argmax, argmin), first index on ties, if the gap clears the margin."""
    if not scores:
        return []
    best = max(range(len(scores)), key=scores.__getitem__)
    worst = min(range(len(scores)), key=scores.__getitem__)
    return [(best, worst)] if scores[best] - scores[worst] > margin else []


def _all_pairs(scores: list[float], margin: float) -> list[Pair]:
    """Every ordered pair above the margin, widest gap first (ties keep (i, j) order)."""
    pairs = [
        (i, j) for i, s_i in enumerate(scores) for j, s_j in enumerate(scores) if s_i - s_j > margin
    ]
    # sorted() is stable, so equal gaps stay in row-major (i, j) order: reproducible batches.
    return sorted(pairs, key=lambda p: scores[p[1]] - scores[p[0]])


PAIR_STRATEGIES: dict[str, Callable[[list[float], float], list[Pair]]] = {
    "best-worst": _best_worst,
    "all": _all_pairs,
}


def make_pairs(
    scores: Sequence[float], *, margin: float = 0.0, strategy: str = "best-worst"
) -> list[Pair]:
    """Preference pairs (winner_index, loser_index) with s_w - s_l > margin.

    `strategy` is a key of `PAIR_STRATEGIES`: `best-worst` gives at most one pair (argmax,
    argmin); `all` gives every ordered pair above the margin, sorted by descending gap.
    A prompt whose scores all lie within `margin` of each other gives [].
    """
    if strategy not in PAIR_STRATEGIES:
        valid = ", ".join(sorted(PAIR_STRATEGIES))
        raise ValueError(f"unknown pair strategy {strategy!r}: use one of {valid}")
    if not margin >= 0.0:  # also rejects NaN
        raise ValueError(f"margin is {margin}: it must be >= 0 (0 keeps every strict preference)")
    return PAIR_STRATEGIES[strategy](_check_scores(scores), float(margin))


def listwise_target(scores: Sequence[float], *, tau: float) -> list[float]:
    """The label distribution d = softmax(s / tau) over one prompt's candidates.

    Small tau concentrates d on the best candidates, large tau flattens it towards uniform.
    Computed as exp((s_i - max s) / tau) / sum, so large scores or small tau cannot overflow.
    """
    if not tau > 0.0:  # also rejects NaN
        raise ValueError(f"tau is {tau}: the listwise temperature must be > 0")
    values = _check_scores(scores)
    if not values:
        return []
    top = max(values)
    weights = [math.exp((s - top) / tau) for s in values]
    total = math.fsum(weights)  # >= 1: the top score contributes exp(0)
    return [w / total for w in weights]


def is_tied(scores: Sequence[float], eps: float = 1e-9) -> bool:
    """True when all scores lie within eps of each other (no pair, zero-variance group).

    Fewer than two scores count as tied: there is nothing to prefer.
    """
    values = _check_scores(scores)
    if len(values) < 2:
        return True
    return max(values) - min(values) <= eps
