"""Score calibration, unfinished candidates, the anchor as positive and the pooled advantage,
each checked against numbers derived by hand."""

from __future__ import annotations

import math

import pytest

from edge_pu.algo.preferences import calibrate, group_scores, pooled_reward_std
from edge_pu.config import TrainConfig
from edge_pu.train import ANCHOR, build_units


def test_pooled_calibration_keeps_near_ties_small_and_zscore_inflates_them() -> None:
    """Groups a = [0, 1, 2] (population variance 2/3) and b = [0, .001, .002] (variance
    2/3 * 1e-6). Pooled S = sqrt((2/3 + 2/3e-6) / 2) ~= sqrt(1/3) = 0.57735, so a becomes
    [-1.7320, 0, 1.7320] and b stays a thousand times smaller; a z-score per group gives both
    [-1.2247, 0, 1.2247] (= -+sqrt(3/2)): the 0.001 gap becomes as loud as the gap of 1."""
    groups = {"a": [0.0, 1.0, 2.0], "b": [0.0, 0.001, 0.002]}
    pooled = calibrate(groups, "pooled")
    s = math.sqrt((2 / 3 + 2 / 3 * 1e-6) / 2)
    assert pooled["a"] == pytest.approx([-1 / s, 0.0, 1 / s])
    assert pooled["b"] == pytest.approx([-0.001 / s, 0.0, 0.001 / s])
    z = calibrate(groups, "zscore")
    assert z["a"] == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert z["b"] == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])


def test_rank_calibration_averages_ties() -> None:
    """[0, 1, 1, 3]: ranks 1, 2.5, 2.5, 4, centred -1.5, 0, 0, 1.5, divided by the std of
    1..4, sqrt(15/12) = 1.1180: [-1.3416, 0, 0, 1.3416]."""
    out = calibrate({"g": [0.0, 1.0, 1.0, 3.0]}, "rank")["g"]
    assert out == pytest.approx([-1.5 / math.sqrt(1.25), 0.0, 0.0, 1.5 / math.sqrt(1.25)])


def test_unfinished_candidates_rank_below_every_finished_one() -> None:
    """Scores [0.5, 0.1, 0.9, 0.3] with candidate 2 unfinished. Finished [0.5, 0.1, 0.3]:
    mean 0.3, variance (0.04 + 0.04 + 0) / 3, pooled S = 0.16330 (one group); calibrated
    [1.2247, -1.2247, 0]; the unfinished one, although its raw score is the best, goes one
    unit under the worst: -2.2247. `drop` gives it None; `keep` calibrates all four."""
    scores, fin = {"g": [0.5, 0.1, 0.9, 0.3]}, {"g": [True, True, False, True]}
    below = group_scores(scores, fin, calibration="pooled", unfinished="below")["g"]
    assert below == pytest.approx([1.2247449, -1.2247449, -2.2247449, 0.0])
    drop = group_scores(scores, fin, calibration="pooled", unfinished="drop")["g"]
    assert drop[2] is None and drop[0] == pytest.approx(1.2247449)
    keep = group_scores(scores, fin, calibration="pooled", unfinished="keep")["g"]
    assert max(range(4), key=lambda i: keep[i]) == 2


def test_anchor_is_the_labelled_positive_in_pairs_and_groups() -> None:
    """Candidates scored [0.5, 0.1, 0.9, 0.3], all finished: mean 0.45, population variance
    0.35 / 4 = 0.0875, pooled S = 0.29580 -> z = [0.1690, -1.1832, 1.5213, -0.5071]. DPO
    best-worst: (2, 1) and, with the anchor, (anchor, 1). GRPO: K + 1 = 5 rows, the anchor at
    z = 1.5213 + 1 = 2.5213 holding the largest share of d = softmax(z / 0.5)."""
    scores = {"p": [0.5, 0.1, 0.9, 0.3]}
    cands = {"p": [[1], [2], [3], [4]]}
    anchors = {"p": [9, 9]}
    dpo = TrainConfig(algorithm="dpo", anchor="positive", anchor_margin=1.0)
    units, records, counts = build_units(dpo, {"p": [0]}, cands, scores, anchors=anchors)
    assert [(r["chosen"], r["rejected"]) for r in records] == [(2, 1), (ANCHOR, 1)]
    assert units[1].completions == [[9, 9], [2]] and counts["anchor_units"] == 1
    grpo = TrainConfig(algorithm="grpo", anchor="positive", anchor_margin=1.0, tau=0.5)
    units, records, _ = build_units(grpo, {"p": [0]}, cands, scores, anchors=anchors)
    z = [(v - 0.45) / math.sqrt(0.0875) for v in (0.5, 0.1, 0.9, 0.3)]
    assert z[2] == pytest.approx(1.5213, abs=1e-4)
    z.append(z[2] + 1.0)
    w = [math.exp(v / 0.5) for v in z]
    assert units[0].target == pytest.approx([x / sum(w) for x in w])
    assert records[0]["rows"] == [0, 1, 2, 3, ANCHOR]


def test_pooled_reward_std_is_the_root_mean_group_variance() -> None:
    """d1 = [0.5, 0.5] -> r = [1, 1], variance 0; d2 = [1, 0] -> r = [2, 0], variance 1;
    pooled std = sqrt((0 + 1) / 2) = 0.70711."""
    assert pooled_reward_std([[0.5, 0.5], [1.0, 0.0]]) == pytest.approx(math.sqrt(0.5))


def test_pooled_advantage_does_not_inflate_a_near_tie() -> None:
    """Two groups, K = 2: d = [0.5001, 0.4999] (r = [1.0002, 0.9998]) and d = [0.9, 0.1]
    (r = [1.8, 0.2]). Per-group std (+ eps 1e-6): the near-tie gets 0.0002 / 0.000201 =
    +-0.995, almost the clear group's +-1. Pooled std = sqrt((0.0002^2 +
    0.8^2) / 2) = 0.565686: the near-tie gets +-0.0002 / 0.565686 = +-0.000354, the clear
    group +-0.8 / 0.565686 = +-1.41421."""
    import torch

    from edge_pu.algo.losses import group_advantages

    target = torch.tensor([[0.5001, 0.4999], [0.9, 0.1]], dtype=torch.float64)
    per_group = group_advantages(target)
    assert per_group.flatten().tolist() == pytest.approx([0.995, -0.995, 1, -1], abs=1e-3)
    s = math.sqrt((0.0002 ** 2 + 0.8 ** 2) / 2)
    assert pooled_reward_std(target.tolist()) == pytest.approx(s)
    pooled = group_advantages(target, adv_std=s)
    assert pooled.flatten().tolist() == pytest.approx(
        [0.0002 / s, -0.0002 / s, 0.8 / s, -0.8 / s], rel=1e-6)


def test_select_spread_spends_the_step_budget_on_the_prompts_the_ranker_tells_apart() -> None:
    """Three prompts, GRPO, 2 steps x 1 group: budget 2 of 3 prompts. Raw scores
    a = [1, 1, 1] (tied), b = [0, 2, 4] (population variance 8/3), c = [0, 1, 2] (2/3).
    Pooled S = sqrt((0 + 8/3 + 2/3) / 3) = sqrt(10/9) = 1.0541; spreads = sqrt(var) / S:
    a 0, b 1.5492, c 0.7746. `spread` keeps b and c and counts a as unselected; `all` keeps
    all three; with a budget of 3 steps, or none (epochs), `spread` still leaves the tied a
    out. For DPO best-worst with the anchor a prompt gives 2 pairs, so 2 steps x 1 pair is a
    budget of 1 prompt: b."""
    from edge_pu.algo.preferences import group_spread

    scores = {"a": [1.0, 1.0, 1.0], "b": [0.0, 2.0, 4.0], "c": [0.0, 1.0, 2.0]}
    cands = {p: [[1], [2], [3]] for p in scores}
    ids = {p: [0] for p in scores}
    anchors = {p: [9] for p in scores}
    cal = group_scores(scores, {p: [True] * 3 for p in scores}, calibration="pooled",
                       unfinished="below")
    s = math.sqrt(10 / 9)
    assert group_spread(cal["b"]) == pytest.approx(math.sqrt(8 / 3) / s)
    assert group_spread(cal["c"]) == pytest.approx(math.sqrt(2 / 3) / s)
    assert group_spread(cal["a"]) == 0.0
    cfg = TrainConfig(algorithm="grpo", steps=2, batch_size=1, select="spread")
    units, _, counts = build_units(cfg, ids, cands, scores, anchors=anchors)
    assert [u.prompt_id for u in units] == ["b", "c"] and counts["unselected"] == 1
    units, _, counts = build_units(TrainConfig(algorithm="grpo", steps=2, batch_size=1,
                                               select="all"), ids, cands, scores,
                                   anchors=anchors)
    assert [u.prompt_id for u in units] == ["a", "b", "c"] and counts["unselected"] == 0
    for steps in (3, 0):
        wide = TrainConfig(algorithm="grpo", steps=steps, batch_size=1, select="spread")
        assert [u.prompt_id for u in build_units(wide, ids, cands, scores,
                                                 anchors=anchors)[0]] == ["b", "c"]
    dpo = TrainConfig(algorithm="dpo", steps=2, batch_size=1, select="spread")
    units, _, counts = build_units(dpo, ids, cands, scores, anchors=anchors)
    assert {u.prompt_id for u in units} == {"b"} and counts["unselected"] == 2
