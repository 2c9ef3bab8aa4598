"""Self-ranking arithmetic, derived by hand, and the rankers on a real tiny model.

The arithmetic tests drive the rankers with `TableBackend`, whose log-probs are hand-picked
numbers looked up by (prompt, completion): the ranker's maths is what is under test, not a model.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from edge_pu.config import RankerConfig, load_config
from edge_pu.rank import RANKERS, RankItem, draft_prompt, reference_prompt


class TableBackend:
    """Token ids are the characters' code points; log-probs come from a table."""

    def __init__(self, table: dict[tuple[str, str], list[float]],
                 next_token: dict[str, dict[str, float]] | None = None) -> None:
        self.table = table
        self.next_token = next_token or {}
        self.adapter_calls: list[bool] = []

    def chat_ids(self, messages, *, assistant=None):
        return [ord(c) for c in messages[-1]["content"]]

    def token_ids(self, text):
        return [ord(c) for c in text]

    def logprobs(self, prompt_ids, completion_ids, *, adapter=True):
        self.adapter_calls.append(adapter)
        out = []
        for p, c in zip(prompt_ids, completion_ids, strict=True):
            out.append(self.table[("".join(map(chr, p)), "".join(map(chr, c)))])
        return out

    def next_token_logprobs(self, prompt_ids, candidates, *, adapter=True):
        self.adapter_calls.append(adapter)
        rows = []
        for p in prompt_ids:
            text = "".join(map(chr, p))
            cand = next(v for k, v in self.next_token.items() if k in text)
            rows.append([cand[chr(t)] for t in candidates])
        return rows


def test_likelihood_is_anchor_conditioned_gain_in_mean_token_logprob() -> None:
    """Candidate "ab" (2 tokens), "c" (1 token); prompt x, anchor a.

    s("ab") = mean(-1, -2) - mean(-2, -4) = -1.5 - (-3) = 1.5
    s("c")  = mean(-0.5)   - mean(-0.25)  = -0.25
    Without the anchor: s = the plain mean, -3 and -0.25.
    """
    x, a = "x", "A"
    shown = reference_prompt(x, a)
    backend = TableBackend({
        (shown, "ab"): [-1.0, -2.0], (x, "ab"): [-2.0, -4.0],
        (shown, "c"): [-0.5], (x, "c"): [-0.25],
    })
    item = RankItem("p", x, a, [[ord("a"), ord("b")], [ord("c")]], ["ab", "c"])
    cfg = RankerConfig(mode="likelihood", batch_size=3)
    assert RANKERS["likelihood"](backend, [item], cfg) == [[1.5, -0.25]]
    assert RANKERS["likelihood"](backend, [item], cfg, use_anchor=False) == [[-3.0, -0.25]]
    # The frozen starting student judges by default: every scoring pass had the adapter off.
    assert not any(backend.adapter_calls)


def test_recall_is_the_anchors_mean_token_logprob_with_the_candidate_shown() -> None:
    """Anchor "A" (token 65) + EOS (token 3); candidates "ab" and "c".

    s("ab") = mean(log pi("A", EOS | draft "ab")) = mean(-1, -3) = -2
    s("c")  = mean(-0.5, -0.5) = -0.5: seeing "c" makes the anchor likelier, so "c" ranks first.
    The plain log pi(anchor | x) is the same for both candidates and is not scored.
    """
    x, a = "x", "A"
    backend = TableBackend({(draft_prompt(x, "ab"), "A\x03"): [-1.0, -3.0],
                            (draft_prompt(x, "c"), "A\x03"): [-0.5, -0.5]})
    backend.eos_ids = [3]
    item = RankItem("p", x, a, [[ord("a"), ord("b")], [ord("c")]], ["ab", "c"])
    cfg = RankerConfig(mode="recall", batch_size=1)
    assert RANKERS["recall"](backend, [item], cfg) == [[-2.0, -0.5]]
    assert not any(backend.adapter_calls)


def test_judge_yesno_is_log_odds_and_rating_is_expected_digit() -> None:
    """yes/no: s = log p(Yes) - log p(No): log 0.6 - log 0.2 = log 3 = 1.0986.
    rating: p(1..9) ∝ (0.5 on "9", 0.5 on "1"), expected rating = 0.5*9 + 0.5*1 = 5.0.
    Judge "current" scores with the adapter on.
    """
    yes_no = {"ALPHA": {"Y": math.log(0.6), "N": math.log(0.2)},
              "OMEGA": {"Y": math.log(0.1), "N": math.log(0.8)}}
    backend = TableBackend({}, yes_no)
    # TableBackend tokenizes by character: "Yes" -> "Y", "No" -> "N" (first token).
    item = RankItem("p", "q", "ref", [[1], [2]], ["ALPHA", "OMEGA"])
    cfg = RankerConfig(mode="judge", judge="current", judge_style="yesno", batch_size=2)
    [[good, bad]] = RANKERS["judge"](backend, [item], cfg)
    assert good == pytest.approx(math.log(3.0))
    assert bad == pytest.approx(math.log(0.1 / 0.8))
    assert all(backend.adapter_calls)

    digits = {str(d): math.log(1e-12) for d in range(1, 10)}
    digits.update({"9": math.log(0.5), "1": math.log(0.5)})
    backend = TableBackend({}, {"ALPHA": digits})
    item = RankItem("p", "q", "ref", [[1]], ["ALPHA"])
    cfg = RankerConfig(mode="judge", judge_style="rating")
    [[rating]] = RANKERS["judge"](backend, [item], cfg)
    assert rating == pytest.approx(5.0, abs=1e-6)


def test_similarity_prefers_the_candidate_closer_to_the_anchor() -> None:
    item = RankItem("p", "q", "The answer is 42.", [[1], [2], [3]],
                    ["The answer is 42.", "The answer is 41.", "no idea"])
    [[same, close, far]] = RANKERS["similarity"](None, [item], RankerConfig())
    assert same == pytest.approx(1.0)
    assert same > close > far


def test_random_scores_are_seeded_by_prompt_id() -> None:
    a = RankItem("p1", "q", "r", [[1], [2], [3]], ["a", "b", "c"])
    first = RANKERS["random"](None, [a], RankerConfig())
    assert first == RANKERS["random"](None, [a], RankerConfig())
    b = RankItem("p2", "q", "r", [[1], [2], [3]], ["a", "b", "c"])
    assert first != RANKERS["random"](None, [b], RankerConfig())


@pytest.mark.parametrize("mode", ["likelihood", "judge", "recall"])
def test_rankers_on_a_real_tiny_model(tiny_llama_dir: Path, mode: str) -> None:
    """On a real model, scores are finite, per-candidate, and identical on a second call."""
    from edge_pu.backends import make_backend

    cfg = load_config(None, base={"student": {"path": str(tiny_llama_dir)}, "backend": "cpu"})
    backend = make_backend("cpu")
    backend.load(cfg)
    texts = ["one two three", "apple", "the answer is five"]
    item = RankItem("p", "what is two plus three?", "five",
                    [backend.token_ids(t) for t in texts], texts)
    rcfg = RankerConfig(mode=mode, batch_size=2)
    first = RANKERS[mode](backend, [item], rcfg)
    assert len(first[0]) == 3 and all(math.isfinite(s) for s in first[0])
    assert first[0] == pytest.approx(RANKERS[mode](backend, [item], rcfg)[0])
    assert len(set(first[0])) > 1
