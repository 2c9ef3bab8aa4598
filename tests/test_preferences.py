"""Preference pairs and listwise targets from self-ranking scores, checked against hand maths."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from edge_pu.algo.preferences import PAIR_STRATEGIES, is_tied, listwise_target, make_pairs


def test_best_worst_takes_argmax_over_argmin_when_the_gap_clears_the_margin() -> None:
    """scores [0.25, 1.0, 0.5]: argmax 1, argmin 0, gap 0.75 (exact in binary).

    margin 0.5 < 0.75 -> [(1, 0)]; margin 0.75 is not strictly exceeded -> [].
    """
    scores = [0.25, 1.0, 0.5]
    assert make_pairs(scores) == [(1, 0)]
    assert make_pairs(scores, margin=0.5) == [(1, 0)]
    assert make_pairs(scores, margin=0.75) == []


def test_all_pairs_sorted_by_descending_gap_and_filtered_by_margin() -> None:
    """scores [0.5, 0.25, 1.0]: positive gaps (0,1)=0.25, (2,0)=0.5, (2,1)=0.75.

    margin 0 keeps all three, widest first (the reverse of row-major order); margin 0.25
    drops (0,1), whose gap only equals it.
    """
    scores = [0.5, 0.25, 1.0]
    assert make_pairs(scores, strategy="all") == [(2, 1), (2, 0), (0, 1)]
    assert make_pairs(scores, strategy="all", margin=0.25) == [(2, 1), (2, 0)]


def test_all_pairs_keep_row_major_order_on_equal_gaps() -> None:
    """scores [1, 0, 1]: (0,1) and (2,1) both have gap 1; (0,2) and (2,0) tie (gap 0), no pair.

    A stable sort keeps (0,1) before (2,1).
    """
    assert make_pairs([1.0, 0.0, 1.0], strategy="all") == [(0, 1), (2, 1)]


def test_tied_scores_give_no_pair() -> None:
    """All three candidates score 0.5: no strictly better candidate, so nothing to prefer."""
    tied = [0.5, 0.5, 0.5]
    for strategy in PAIR_STRATEGIES:
        assert make_pairs(tied, strategy=strategy) == []
    assert make_pairs([], strategy="all") == []
    assert is_tied(tied)


def test_is_tied_uses_eps() -> None:
    """[0, 1e-12] differ by less than the default eps 1e-9; [0, 1e-3] do not, unless eps=1e-2.

    Zero or one score is tied: there is no pair to form.
    """
    assert is_tied([0.0, 1e-12])
    assert not is_tied([0.0, 1e-3])
    assert is_tied([0.0, 1e-3], eps=1e-2)
    assert is_tied([]) and is_tied([7.0])


def test_listwise_target_by_hand() -> None:
    """scores [0, ln2, ln4], tau 1: exp -> [1, 2, 4], sum 7 -> d = [1/7, 2/7, 4/7]."""
    d = listwise_target([0.0, math.log(2), math.log(4)], tau=1.0)
    assert d == pytest.approx([1 / 7, 2 / 7, 4 / 7], rel=1e-12)


def test_tau_sharpens_or_flattens_the_target() -> None:
    """Same scores [0, ln2, ln4]:

    tau 0.5: exp(2 s) = [1, 4, 16], sum 21 -> [1/21, 4/21, 16/21] (sharper);
    tau 2:   exp(s / 2) = [1, sqrt2, 2], sum 3 + sqrt2 (flatter).
    """
    scores = [0.0, math.log(2), math.log(4)]
    assert listwise_target(scores, tau=0.5) == pytest.approx([1 / 21, 4 / 21, 16 / 21])
    z = 3 + math.sqrt(2)
    assert listwise_target(scores, tau=2.0) == pytest.approx([1 / z, math.sqrt(2) / z, 2 / z])


def test_listwise_target_is_stable_for_large_scores() -> None:
    """[1000, 1000 + ln3], tau 1: exp(1000) overflows a float, but the shift by the max gives
    exp([-ln3, 0]) = [1/3, 1], sum 4/3 -> d = [1/4, 3/4]. Tied scores give uniform d."""
    assert listwise_target([1000.0, 1000.0 + math.log(3)], tau=1.0) == pytest.approx([0.25, 0.75])
    assert listwise_target([2.0, 2.0, 2.0, 2.0], tau=0.1) == [0.25] * 4
    assert listwise_target([], tau=1.0) == []


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan")])
def test_non_positive_tau_is_rejected(tau: float) -> None:
    with pytest.raises(ValueError, match="tau"):
        listwise_target([0.0, 1.0], tau=tau)


def test_unknown_strategy_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="all, best-worst"):
        make_pairs([0.0, 1.0], strategy="top-k")


def test_bad_scores_and_margin_are_rejected() -> None:
    """A NaN score would silently compare False and drop pairs; a negative margin would pair
    tied candidates (best-worst on [1, 1] would return (0, 0))."""
    with pytest.raises(ValueError, match="score 1"):
        make_pairs([0.0, float("nan")])
    with pytest.raises(ValueError, match="score 0"):
        listwise_target([float("nan")], tau=1.0)
    with pytest.raises(ValueError, match="margin"):
        make_pairs([1.0, 1.0], margin=-0.5)


def test_preferences_and_rank_metrics_do_not_import_torch() -> None:
    """The ranking maths is pure Python: importing it must not pull in torch or numpy."""
    code = (
        "import sys, edge_pu.algo, edge_pu.algo.preferences, edge_pu.algo.rank_metrics;"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
