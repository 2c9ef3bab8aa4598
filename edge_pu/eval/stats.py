"""Paired differences with bootstrap intervals: how the evaluation says whether a lift is real.

`paired_lift(a, b)`: a and b hold one number per prompt (a method's pass, 0/1, or its mean over
seeds) on the same prompts; the lift is mean(a - b), and its 95% interval is the percentile
bootstrap over prompts (resampling prompts with replacement, the pairs kept together). A lift
whose interval contains 0 is reported as no effect. `mean_ci(xs)` is the same interval for one
list (e.g. per-prompt Kendall taus). Pure Python, seeded: the same numbers give the same
interval.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence


def mean_ci(xs: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
            level: float = 0.95) -> dict[str, float]:
    """{"mean", "lo", "hi", "n"}: the mean of xs and its percentile-bootstrap interval."""
    xs = [float(x) for x in xs]
    if not xs:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(statistics.fmean(rng.choices(xs, k=n)) for _ in range(n_boot))
    tail = (1 - level) / 2
    return {"mean": statistics.fmean(xs), "lo": means[int(tail * n_boot)],
            "hi": means[min(n_boot - 1, int((1 - tail) * n_boot))], "n": n}


def paired_lift(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000,
                seed: int = 0) -> dict[str, float]:
    """mean(a_i - b_i) over prompts i with its bootstrap 95% interval, in the units of a."""
    if len(a) != len(b):
        raise ValueError(f"paired_lift needs one value per prompt on both sides, got "
                         f"{len(a)} and {len(b)}")
    return mean_ci([x - y for x, y in zip(a, b, strict=True)], n_boot=n_boot, seed=seed)


def per_prompt_mean(runs: Sequence[Sequence[float]]) -> list[float]:
    """Per-prompt mean over seeds: runs[s][i] is seed s's value on prompt i."""
    if not runs:
        return []
    return [statistics.fmean(r[i] for r in runs) for i in range(len(runs[0]))]


def verdict(ci: dict[str, float]) -> str:
    """'better' / 'worse' when the interval excludes 0, else 'no effect'."""
    if ci["lo"] > 0:
        return "better"
    if ci["hi"] < 0:
        return "worse"
    return "no effect"
