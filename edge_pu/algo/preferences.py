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
from collections.abc import Callable, Mapping, Sequence

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


# ---- calibration: one scale for every ranker ----------------------------------------------

def _pvar(values: Sequence[float]) -> float:
    m = math.fsum(values) / len(values)
    return math.fsum((v - m) ** 2 for v in values) / len(values)


def _ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            out[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return out


def _centred(values: Sequence[float]) -> list[float]:
    m = math.fsum(values) / len(values)
    return [v - m for v in values]


def calibrate(groups: Mapping[str, Sequence[float]], method: str) -> dict[str, list[float]]:
    """Put each group's scores on a common scale (METHOD.md: "calibrated within a group").

    - `pooled`: z_i = (s_i - mean_g s) / S, with S = sqrt(mean over groups of the population
      variance within a group), one S for the whole round. A typical group then spreads about
      +-1 whatever the ranker's raw scale (likelihood tenths of a nat, judge log-odds several
      nats, chrF 0-1), so tau means the same for every ranker, while a group whose candidates
      barely differ keeps its small spread: near-ties are not inflated into full-size signal.
    - `zscore`: the same with each group's own std (a 1e-4 gap becomes +-1: inflates ties).
    - `rank`: tied-average ranks, centred and divided by the std of 1..K.
    - `none`: the raw scores.
    Groups of one score, or with no spread, come out as zeros (pooled/zscore/rank).
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {method!r}: use one of {', '.join(CALIBRATIONS)}")
    checked = {g: _check_scores(s) for g, s in groups.items()}
    if method == "none":
        return checked
    if method == "pooled":
        spread = [_pvar(s) for s in checked.values() if len(s) >= 2]
        scale = math.sqrt(math.fsum(spread) / len(spread)) if spread else 0.0
        return {g: [v / scale if scale > 0 else 0.0 for v in _centred(s)] if s else []
                for g, s in checked.items()}
    out: dict[str, list[float]] = {}
    for g, s in checked.items():
        vals = _ranks(s) if method == "rank" else s
        sd = math.sqrt((len(s) ** 2 - 1) / 12) if method == "rank" else \
            (math.sqrt(_pvar(s)) if s else 0.0)
        out[g] = [v / sd if sd > 1e-12 else 0.0 for v in _centred(vals)] if s else []
        if method == "rank" and s and max(s) - min(s) <= 1e-12:
            out[g] = [0.0] * len(s)
    return out


CALIBRATIONS = ("pooled", "zscore", "rank", "none")
UNFINISHED_GAP = 1.0  # calibrated units between the worst finished and the unfinished


def group_scores(scores: Mapping[str, Sequence[float]], finished: Mapping[str, Sequence[bool]],
                 *, calibration: str, unfinished: str) -> dict[str, list[float | None]]:
    """Calibrated scores per group, with unfinished candidates handled as configured.

    The scale is fitted on finished candidates only (a ramble cut at max_new_tokens is not an
    answer, METHOD.md). `unfinished`:
    - `below`: every unfinished candidate scores UNFINISHED_GAP under the group's worst
      finished one (all tied there); a group with no finished candidate keeps its calibrated
      order (then nothing is known to be better);
    - `drop`: unfinished candidates get None (no pair uses them);
    - `keep`: finished or not, all are calibrated together (the old behaviour).
    """
    if unfinished not in ("below", "drop", "keep"):
        raise ValueError(f"unknown unfinished rule {unfinished!r}: use below, drop or keep")
    if unfinished == "keep":
        return {g: list(v) for g, v in calibrate(scores, calibration).items()}
    done = {g: [s for s, f in zip(v, finished[g], strict=True) if f] for g, v in scores.items()}
    cal_done = calibrate({g: v for g, v in done.items() if v}, calibration)
    open_ = {g: [s for s, f in zip(v, finished[g], strict=True) if not f]
             for g, v in scores.items() if not any(finished[g])}
    cal_open = calibrate(open_, calibration) if open_ else {}
    out: dict[str, list[float | None]] = {}
    for g, v in scores.items():
        fin = list(finished[g])
        if not any(fin):
            out[g] = list(cal_open[g]) if unfinished == "below" else [None] * len(v)
            continue
        it = iter(cal_done[g])
        floor = min(cal_done[g]) - UNFINISHED_GAP
        out[g] = [next(it) if f else (floor if unfinished == "below" else None) for f in fin]
    return out


def group_spread(cal: Sequence[float | None]) -> float:
    """Population std of a group's calibrated scores (unfinished candidates at the place the
    `unfinished` rule gave them, dropped ones left out): how much the training signal tells
    this prompt's candidates apart (edge_pu.train.select_prompts)."""
    vals = [v for v in cal if v is not None]
    return math.sqrt(_pvar(vals)) if len(vals) >= 2 else 0.0


def pooled_reward_std(targets: Sequence[Sequence[float]]) -> float:
    """sqrt(mean over groups of the population variance of r = K d): the round's typical
    spread of GRPO rewards, the divisor of `advantage_norm: pooled`."""
    var = [_pvar([len(d) * x for x in d]) for d in targets if len(d) >= 2]
    return math.sqrt(math.fsum(var) / len(var)) if var else 0.0
