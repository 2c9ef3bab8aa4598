"""Anchor-conditioned self-ranking: the student scores its own candidates against the anchor.

Modes (METHOD.md), selected by name from `RANKERS`:
- `likelihood`: s_i = mean-token log pi(y_i | x, anchor shown) - mean-token log pi(y_i | x).
  Works for any causal LM; two scoring passes per candidate.
- `judge`: the student, shown the instruction, the anchor as a high-quality reference and one
  candidate, answers "Is the candidate as good as the reference?"; s_i = log p(Yes) - log p(No)
  (style `yesno`) or the expected 1-9 rating over the digit tokens (style `rating`). Pointwise,
  so there is no position bias.
- `recall`: how well a candidate lets the student predict the anchor: s_i = mean-token
  log pi(anchor | x, y_i shown as a draft). The student's own copy of a reference answer as a
  soft, model-based similarity (a small student copies what it is shown far better than it
  judges); one scoring pass per candidate. The anchor-only term log pi(anchor | x) would be
  the same for every candidate of a prompt, so it is left out (it cancels in any within-group
  calibration).
- `similarity` (chrF to the anchor), `bleu` (sentence BLEU to the anchor) and `random`:
  baselines that are not self-ranking.
- `reward`: the user's reward functions (verifiers, `ranker.reward_funcs`, TRL's calling
  convention; edge_pu.rewards), optionally with ties broken by a self-ranking mode
  (`ranker.reward_tiebreak`). Not label-free: an option beside the PU ranking.
With `use_anchor=False`, likelihood and judge drop the reference (the "self-judging without the
anchor" baseline): likelihood becomes mean-token log pi(y_i | x).
The judge weights are the frozen starting student (`ranker.judge: initial`, adapter disabled)
or the current policy (`current`).
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .algo.rank_metrics import bleu, chrf
from .backends.base import Backend
from .config import RankerConfig
from .data import Prompt, prompt_ids


@dataclass(frozen=True)
class RankItem:
    prompt_id: str
    prompt: Prompt | str  # a string is one user turn
    anchor: str
    candidates: list[list[int]]  # completion token ids
    texts: list[str]

    @property
    def chat(self) -> Prompt:
        return self.prompt if isinstance(self.prompt, Prompt) else Prompt(self.prompt_id,
                                                                           self.prompt)


def reference_prompt(prompt: str, anchor: str) -> str:
    return (f"{prompt}\n\nHere is a high-quality reference answer:\n{anchor}\n\n"
            "Now give your own answer to the request above.")


def draft_prompt(prompt: str, candidate: str) -> str:
    return (f"{prompt}\n\nHere is a draft answer:\n{candidate}\n\n"
            "Now give the final answer to the request above.")


def judge_prompt(prompt: str, anchor: str | None, candidate: str, style: str) -> str:
    ref = f"Reference answer (high quality):\n{anchor}\n\n" if anchor is not None else ""
    ask = ("Is the candidate answer as good as the reference answer? Reply Yes or No."
           if anchor is not None else "Is the candidate answer correct? Reply Yes or No.")
    if style == "rating":
        ask = "Rate the candidate answer from 1 (bad) to 9 (perfect). Reply with one digit."
    return f"Instruction:\n{prompt}\n\n{ref}Candidate answer:\n{candidate}\n\n{ask}"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _batches(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def likelihood_scores(backend: Backend, items: Sequence[RankItem], cfg: RankerConfig,
                      use_anchor: bool = True) -> list[list[float]]:
    adapter = cfg.judge == "current"
    rows: list[tuple[list[int], list[int], list[int]]] = []  # plain prompt, anchored, completion
    for it in items:
        # The anchor is shown inside the last user turn; earlier turns stay as they are.
        plain = prompt_ids(backend, it.chat)
        shown = prompt_ids(backend, it.chat,
                           last_user=reference_prompt(it.chat.last_user, it.anchor))
        rows += [(plain, shown, c if c else [backend.token_ids(" ")[0]]) for c in it.candidates]
    flat: list[float] = []
    for b in _batches(len(rows), cfg.batch_size):
        comps = [rows[i][2] for i in b]
        plain_lp = backend.logprobs([rows[i][0] for i in b], comps, adapter=adapter)
        if not use_anchor:
            flat += [_mean(p) for p in plain_lp]
            continue
        shown_lp = backend.logprobs([rows[i][1] for i in b], comps, adapter=adapter)
        flat += [_mean(s) - _mean(p) for s, p in zip(shown_lp, plain_lp, strict=True)]
    return _regroup(flat, items)


def recall_scores(backend: Backend, items: Sequence[RankItem], cfg: RankerConfig,
                  use_anchor: bool = True) -> list[list[float]]:
    if not use_anchor:  # without the anchor there is nothing to recall: plain likelihood
        return likelihood_scores(backend, items, cfg, use_anchor=False)
    from .sft import anchor_completion  # the anchor as SFT trains it: its tokens, then EOS

    adapter = cfg.judge == "current"
    rows: list[tuple[list[int], list[int]]] = []  # prompt with the draft shown, anchor ids
    for it in items:
        anchor = anchor_completion(backend, it.anchor)
        rows += [(prompt_ids(backend, it.chat, last_user=draft_prompt(it.chat.last_user, t)),
                  anchor) for t in it.texts]
    flat: list[float] = []
    for b in _batches(len(rows), cfg.batch_size):
        lps = backend.logprobs([rows[i][0] for i in b], [rows[i][1] for i in b],
                               adapter=adapter)
        flat += [_mean(lp) for lp in lps]
    return _regroup(flat, items)


def judge_scores(backend: Backend, items: Sequence[RankItem], cfg: RankerConfig,
                 use_anchor: bool = True) -> list[list[float]]:
    adapter = cfg.judge == "current"
    words = ["Yes", "No"] if cfg.judge_style == "yesno" else [str(d) for d in range(1, 10)]
    token = [backend.token_ids(w)[0] for w in words]
    # The judge reads the whole conversation (Prompt.text) as the instruction, in one turn.
    prompts = [prompt_ids(backend, judge_prompt(
        it.chat.text, it.anchor if use_anchor else None, text, cfg.judge_style))
        for it in items for text in it.texts]
    flat: list[float] = []
    for b in _batches(len(prompts), cfg.batch_size):
        for lp in backend.next_token_logprobs([prompts[i] for i in b], token, adapter=adapter):
            flat.append(_judge_value(lp, cfg.judge_style))
    return _regroup(flat, items)


def _judge_value(logps: Sequence[float], style: str) -> float:
    import math

    if style == "yesno":
        return logps[0] - logps[1]
    probs = [math.exp(x) for x in logps]
    return sum((i + 1) * p for i, p in enumerate(probs)) / sum(probs)


def similarity_scores(backend: Backend, items: Sequence[RankItem], cfg: RankerConfig,
                      use_anchor: bool = True) -> list[list[float]]:
    return [[chrf(t, it.anchor) for t in it.texts] for it in items]


def bleu_scores(backend: Backend, items: Sequence[RankItem], cfg: RankerConfig,
                use_anchor: bool = True) -> list[list[float]]:
    return [[bleu(t, it.anchor) for t in it.texts] for it in items]


def random_scores(backend: Backend, items: Sequence[RankItem], cfg: RankerConfig,
                  use_anchor: bool = True) -> list[list[float]]:
    out = []
    for it in items:
        rng = random.Random(zlib.crc32(it.prompt_id.encode()))
        out.append([rng.random() for _ in it.texts])
    return out


def reward_scores(backend: Backend, items: Sequence[RankItem], cfg: RankerConfig,
                  use_anchor: bool = True) -> list[list[float]]:
    from .rewards import tiebreak

    out = candidate_rewards(cfg, items)
    if cfg.reward_tiebreak:
        own = RANKERS[cfg.reward_tiebreak](backend, items, cfg, use_anchor=use_anchor)
        out = [tiebreak(r, s) for r, s in zip(out, own, strict=True)]
    return out


def candidate_rewards(cfg: RankerConfig, items: Sequence[RankItem]) -> list[list[float]]:
    """Every item's candidates scored by the reward functions, in one call per function."""
    from .rewards import call_rewards

    rows = [(it, j) for it in items for j in range(len(it.texts))]
    return _regroup(call_rewards(cfg.reward_funcs, cfg.reward_weights,
                                 [it.chat for it, _ in rows], [it.texts[j] for it, j in rows],
                                 [it.candidates[j] for it, j in rows],
                                 [it.prompt_id for it, _ in rows]), items)


def anchor_rewards(cfg: RankerConfig, items: Sequence[RankItem]) -> list[float]:
    """Each item's anchor scored by the reward functions, as if it were a candidate."""
    from .rewards import call_rewards

    return call_rewards(cfg.reward_funcs, cfg.reward_weights, [it.chat for it in items],
                        [it.anchor for it in items], [[] for _ in items],
                        [it.prompt_id for it in items])


def anchor_gate(cfg: RankerConfig, check: str, items: Sequence[RankItem],
                scores: dict[str, list[float]]) -> set[str]:
    """The prompts whose anchor may join training as the positive (`train.anchor_check`):
    every prompt without reward functions or with `none`; else those whose anchor's reward is
    at least the best candidate's (a teacher answer that breaks its own prompt's constraints
    is not pushed)."""
    if not cfg.reward_funcs or check == "none":
        return {it.prompt_id for it in items}
    cand = ([scores[it.prompt_id] for it in items] if cfg.mode == "reward"
            and not cfg.reward_tiebreak else candidate_rewards(cfg, items))
    return {it.prompt_id for it, a, c in zip(items, anchor_rewards(cfg, items), cand,
                                             strict=True) if a >= max(c) - 1e-9}


def _regroup(flat: list[float], items: Sequence[RankItem]) -> list[list[float]]:
    out, pos = [], 0
    for it in items:
        out.append(flat[pos: pos + len(it.candidates)])
        pos += len(it.candidates)
    return out


Ranker = Callable[..., list[list[float]]]
RANKERS: dict[str, Ranker] = {
    "likelihood": likelihood_scores,
    "judge": judge_scores,
    "recall": recall_scores,
    "similarity": similarity_scores,
    "bleu": bleu_scores,
    "random": random_scores,
    "reward": reward_scores,
}
