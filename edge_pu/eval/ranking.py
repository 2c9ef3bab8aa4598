"""Ranker quality: does a ranker order a prompt's K candidates the way the checker does?

For each prompt, the K candidates the untrained student sampled get a score from the ranker and
a quality in [0, 1] from the task's checker. Per prompt: Kendall tau-b between the two. Prompts
whose K qualities are all equal carry no order to agree with; they are left out of the mean
tau and counted (`prompts_used` of `prompts_total`). Also reported, to see whether a ranker
"concentrates on near-optimal candidates" (METHOD.md): the mean checker quality of each
prompt's top-scored candidate (ties: the first), next to the mean quality of a random
candidate and of the best one.

Ranker specs: `likelihood`, `judge`, `similarity`, `random` with the anchor, and
`likelihood-noanchor`, `judge-noanchor` without it (edge_pu.rank, use_anchor=False).
Similarity to the anchor and random scores have no "without anchor" variant.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..algo.rank_metrics import kendall_tau
from ..config import RankerConfig
from ..rank import RANKERS, RankItem

RANK_SPECS: dict[str, tuple[str, bool]] = {  # name -> (edge_pu.rank mode, use_anchor)
    "likelihood": ("likelihood", True),
    "likelihood-noanchor": ("likelihood", False),
    "recall": ("recall", True),
    "recall-noanchor": ("recall", False),  # nothing to recall: plain mean-token likelihood
    "judge": ("judge", True),
    "judge-noanchor": ("judge", False),
    "similarity": ("similarity", True),
    "bleu": ("bleu", True),
    "random": ("random", True),
    "oracle": ("oracle", True),  # the checker's quality (edge_pu.eval.runners): the ceiling
    "reward": ("reward", True),  # ranker.reward_funcs (a verifier), edge_pu.rewards
    "reward+recall": ("reward", True),  # the same, equal rewards ordered by recall
}
NEEDS_REWARDS = ("reward", "reward+recall")


def score_items(backend: Any, items: Sequence[RankItem], spec: str, cfg: RankerConfig,
                k: int) -> list[list[float]]:
    """Scores of every item's candidates under ranker `spec`, in batches of ~batch_size rows."""
    mode, use_anchor = RANK_SPECS[spec]
    ranker, rcfg = RANKERS[mode], replace(cfg, mode=mode)
    if spec == "reward+recall":
        rcfg = replace(rcfg, reward_tiebreak="recall")
    step = max(1, cfg.batch_size // max(1, k))
    out: list[list[float]] = []
    for s in range(0, len(items), step):
        out += ranker(backend, items[s: s + step], rcfg, use_anchor=use_anchor)
    return out


def prompt_taus(scores: Sequence[Sequence[float]], qualities: Sequence[Sequence[float]]
                ) -> list[float | None]:
    """Kendall tau per prompt; None where the qualities are constant (no order to agree with)."""
    out: list[float | None] = []
    for s, q in zip(scores, qualities, strict=True):
        out.append(None if len(set(q)) < 2 else kendall_tau(s, q))
    return out


def summarize(scores: Sequence[Sequence[float]], qualities: Sequence[Sequence[float]]
              ) -> dict[str, Any]:
    """{"mean_tau", "prompts_used", "prompts_total", "top1_quality", "mean_quality",
    "best_quality"} over prompts (mean_tau is None when no prompt has varying quality)."""
    taus = [t for t in prompt_taus(scores, qualities) if t is not None]
    top1 = [q[max(range(len(s)), key=lambda i: (s[i], -i))] for s, q in
            zip(scores, qualities, strict=True)]
    return {"mean_tau": statistics.fmean(taus) if taus else None, "taus": taus,
            "prompts_used": len(taus), "prompts_total": len(scores),
            "top1_quality": statistics.fmean(top1) if top1 else 0.0,
            "mean_quality": statistics.fmean(statistics.fmean(q) for q in qualities)
            if qualities else 0.0,
            "best_quality": statistics.fmean(max(q) for q in qualities) if qualities else 0.0}
