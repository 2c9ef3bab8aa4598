"""Kendall tau-b and chrF on small hand-counted examples."""

from __future__ import annotations

import math

import pytest

from edge_pu.algo.rank_metrics import chrf, kendall_tau


def test_kendall_tau_counts_concordant_and_discordant_pairs() -> None:
    """a [1,2,3,4], b [1,3,2,4]: of the 6 pairs only (1,2) swaps order -> C 5, D 1, no ties,
    tau = (5 - 1) / 6 = 2/3. Identical order -> 1, reversed -> -1."""
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_kendall_tau_b_corrects_for_ties() -> None:
    """a [1,2,2,3], b [1,2,3,4]: pair (1,2) tied in a (n1 = 1), the other 5 concordant.
    tau-b = 5 / sqrt((6 - 1)(6 - 0)) = 5 / sqrt(30) = 0.9129 (tau-a would say 5/6 = 0.833).

    a [1,1,2], b [5,5,1]: pair (0,1) tied in both (n1 = n2 = 1), (0,2) and (1,2) discordant:
    tau-b = -2 / sqrt(2 * 2) = -1.
    """
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(30))
    assert kendall_tau([1, 1, 2], [5, 5, 1]) == pytest.approx(-1.0)


def test_kendall_tau_is_zero_when_undefined() -> None:
    """A constant side has no order (the tau-b denominator is 0); so do 0 or 1 items."""
    assert kendall_tau([3, 3, 3], [1, 2, 3]) == 0.0
    assert kendall_tau([1, 2, 3], [0, 0, 0]) == 0.0
    assert kendall_tau([1.0], [2.0]) == 0.0


def test_kendall_tau_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        kendall_tau([1, float("nan")], [1, 2])


def test_chrf_identical_and_disjoint() -> None:
    """Identical strings match every n-gram (P = R = 1 -> 1); disjoint letters match none
    (P = R = 0 -> 0). Whitespace is removed first, so "a b c" equals "abc"."""
    assert chrf("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert chrf("abc", "xyz") == 0.0
    assert chrf("a b c", "abc") == pytest.approx(1.0)


def test_chrf_partial_match_by_hand() -> None:
    """hyp "ab", ref "abc":
    1-grams: hyp {a, b}, ref {a, b, c}, 2 matched -> P 1, R 2/3;
    2-grams: hyp {ab}, ref {ab, bc}, 1 matched -> P 1, R 1/2;
    3..6-grams: hyp has none -> those orders are skipped.
    chrP = 1, chrR = (2/3 + 1/2) / 2 = 7/12.
    beta 2: 5 * 1 * 7/12 / (4 * 1 + 7/12) = (35/12) / (55/12) = 7/11.
    beta 1: 2 * 7/12 / (1 + 7/12) = 14/19, and beta 1 is symmetric in hyp and ref.
    Swapped at beta 2 (chrP 7/12, chrR 1): 5 * 7/12 / (4 * 7/12 + 1) = 35/40 = 7/8.
    """
    assert chrf("ab", "abc") == pytest.approx(7 / 11)
    assert chrf("ab", "abc", beta=1.0) == pytest.approx(14 / 19)
    assert chrf("abc", "ab", beta=1.0) == pytest.approx(14 / 19)
    assert chrf("abc", "ab") == pytest.approx(7 / 8)


def test_chrf_clips_repeated_ngrams() -> None:
    """hyp "aaa", ref "a": 1-grams hyp a x3, ref a x1 -> matches min(3, 1) = 1, P 1/3, R 1;
    2-grams: ref has none -> skipped. F2 = 5 (1/3)(1) / (4/3 + 1) = 5/7."""
    assert chrf("aaa", "a") == pytest.approx(5 / 7)


def test_chrf_empty_and_bad_parameters() -> None:
    assert chrf("", "abc") == 0.0
    assert chrf("  ", "  ") == 0.0
    with pytest.raises(ValueError, match="order"):
        chrf("a", "a", n=0)
    with pytest.raises(ValueError, match="beta"):
        chrf("a", "a", beta=0.0)
