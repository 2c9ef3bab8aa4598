"""DPO and LDL-GRPO losses: values and gradients against hand-derived numbers.

Padding positions hold -inf on purpose: the losses must mask them out of value and gradient.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from edge_pu.algo.losses import (
    LOSSES,
    LossConfig,
    LossInputs,
    dpo_loss,
    group_advantages,
    grpo_advantage_loss,
    grpo_distribution_loss,
    listwise_kl,
    sequence_logp,
)
from edge_pu.algo.preferences import listwise_target

PAD = float("-inf")
LN2 = math.log(2.0)


def leaf(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32, requires_grad=True)


def test_sequence_logp_sums_only_completion_tokens() -> None:
    """Row [-1, -2] fully masked in -> -3; row [-0.5, -inf] with mask [1, 0] -> -0.5."""
    out = sequence_logp(torch.tensor([[-1.0, -2.0], [-0.5, PAD]]), torch.tensor([[1, 1], [1, 0.0]]))
    assert out.tolist() == [-3.0, -0.5]


def dpo_inputs(pairs: list[list[int]]) -> LossInputs:
    """Chosen row 0: pi = -1 - 2 = -3, ref = -1.5 - 2.5 = -4 -> log-ratio +1.
    Rejected row 1: pi = -2, ref = -1 (second token is padding) -> log-ratio -1."""
    return LossInputs(
        token_logp=leaf([[-1.0, -2.0], [-2.0, PAD]]),
        ref_token_logp=torch.tensor([[-1.5, -2.5], [-1.0, PAD]]),
        mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]),
        pairs=torch.tensor(pairs),
    )


def test_dpo_loss_by_hand() -> None:
    """Log-ratio difference chosen - rejected = 1 - (-1) = 2; beta 0.5 -> x = 1.
    loss = -log sigmoid(1) = log(1 + e^-1) = 0.313262; rewards 0.5 * (+1, -1) = (0.5, -0.5)."""
    out = dpo_loss(dpo_inputs([[0, 1]]), LossConfig(beta=0.5))
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert out.metrics == pytest.approx(
        {
            "loss": 0.313262,
            "reward_margin": 1.0,
            "reward_accuracy": 1.0,
            "chosen_reward": 0.5,
            "rejected_reward": -0.5,
        },
        rel=1e-5,
    )


def test_dpo_loss_averages_over_pairs() -> None:
    """Pairs (0,1) with x = 1 and (1,0) with x = -1: log(1 + e^-1) = 0.313262 and
    log(1 + e) = 1 + log(1 + e^-1) = 1.313262, mean 0.813262; one of two pairs is right."""
    out = dpo_loss(dpo_inputs([[0, 1], [1, 0]]), LossConfig(beta=0.5))
    assert out.loss.item() == pytest.approx(0.813262, rel=1e-5)
    assert out.metrics["reward_accuracy"] == 0.5
    assert out.metrics["reward_margin"] == pytest.approx(0.0, abs=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    """dL/dx = -sigmoid(-x) = -sigmoid(-1) = -0.268941; dx/dlogp is +beta on each chosen
    token and -beta on each rejected one: grads -0.134471 (chosen), +0.134471 (rejected),
    0 on padding. Gradient descent therefore raises the chosen completion's log-prob."""
    x = dpo_inputs([[0, 1]])
    dpo_loss(x, LossConfig(beta=0.5)).loss.backward()
    g = 0.5 * (1 / (1 + math.e))
    expected = torch.tensor([[-g, -g], [g, 0.0]])
    assert torch.allclose(x.token_logp.grad, expected, atol=1e-6)


def test_group_advantages_by_hand_with_population_std() -> None:
    """K = 4, d = [1/2, 1/4, 1/8, 1/8] -> r = 4 d = [2, 1, 0.5, 0.5], mean 1,
    population var (1 + 0 + 0.25 + 0.25) / 4 = 0.375, std 0.612372
    -> A = [1.632993, 0, -0.816497, -0.816497] (sample std 0.707107 would give 1.414214...).
    K = 3, d = [1/7, 2/7, 4/7] -> r = [3/7, 6/7, 12/7], mean 1, deviations [-4, -1, 5]/7,
    var (16 + 1 + 25) / 49 / 3 = 2/7, std 0.534522 -> A = [-1.069045, -0.267261, 1.336306]."""
    a4 = group_advantages(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    assert a4.tolist()[0] == pytest.approx([1.632993, 0.0, -0.816497, -0.816497], rel=1e-5)
    a3 = group_advantages(torch.tensor([[1 / 7, 2 / 7, 4 / 7]]))
    assert a3.tolist()[0] == pytest.approx([-1.069045, -0.267261, 1.336306], rel=1e-5)


def test_group_advantages_zero_a_group_whose_std_is_below_eps() -> None:
    """d = [0.5 - 1e-9, 0.5 + 1e-9] (float64): r = [1 - 2e-9, 1 + 2e-9], std 2e-9 <= eps 1e-6.
    Unmasked, A would be +-2e-9 / (2e-9 + 1e-6) = +-0.002: rounding noise passed off as signal."""
    a = group_advantages(torch.tensor([[0.5 - 1e-9, 0.5 + 1e-9]], dtype=torch.float64))
    assert a.tolist() == [[0.0, 0.0]]


def advantage_inputs() -> LossInputs:
    """One K = 3 group with d = [1/7, 2/7, 4/7] over rows 0..2 of lengths 1, 2, 2;
    row 3 is in no group and holds garbage. Policy == reference == old (ratio 1, KL 0)."""
    logp = [[-1.0, PAD], [-0.5, -1.5], [-2.0, -0.25], [float("nan"), 5.0]]
    return LossInputs(
        token_logp=leaf(logp),
        ref_token_logp=torch.tensor(logp),
        mask=torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]]),
        groups=torch.tensor([[0, 1, 2]]),
        target=torch.tensor([[1 / 7, 2 / 7, 4 / 7]]),
    )


def test_grpo_advantage_loss_at_ratio_one_by_hand() -> None:
    """At ratio 1 and KL 0 each token's loss is -A_i, A = [-1.069045, -0.267261, 1.336306].
    "sequence": mean over rows of -A_i = -mean(A) = 0.
    "token": -(sum_i A_i n_i) / sum n_i with n = [1, 2, 2]:
      -(-1.069045 - 0.534522 + 2.672612) / 5 = -1.069045 / 5 = -0.213809.
    Gradient ("sequence"): d/dlogp of -ratio A is -A_i, divided by n_i and by 3 rows:
      row 0: 1.069045 / 3 = 0.356348; row 1: 0.267261 / 6 = 0.044544;
      row 2: -1.336306 / 6 = -0.222718; padding and the ungrouped row 3: 0."""
    x = advantage_inputs()
    out = grpo_advantage_loss(x, LossConfig())
    assert out.loss.item() == pytest.approx(0.0, abs=1e-6)
    out.loss.backward()
    expected = [[0.356348, 0.0], [0.044544, 0.044544], [-0.222718, -0.222718], [0.0, 0.0]]
    assert torch.allclose(x.token_logp.grad, torch.tensor(expected), atol=1e-6)
    assert out.metrics["kl"] == 0.0 and out.metrics["clip_fraction"] == 0.0
    assert out.metrics["adv_abs_mean"] == pytest.approx(2.672612 / 3, rel=1e-5)

    token = grpo_advantage_loss(advantage_inputs(), LossConfig(length_norm="token"))
    assert token.loss.item() == pytest.approx(-0.213809, rel=1e-5)


def test_clipping_stops_the_gradient_only_where_min_picks_the_clipped_term() -> None:
    """K = 2, d = [3/4, 1/4] -> r = [1.5, 0.5], std 0.5 -> A = [+1, -1] (up to eps).
    Both rows have ratio exp(logp - old) = 1.5 > 1 + 0.2.
    Row 0 (A = +1): min(1.5, 1.2) = 1.2, the clipped constant -> zero gradient.
    Row 1 (A = -1): min(-1.5, -1.2) = -1.5, unclipped -> d(-ratio A)/dlogp = 1.5, / 2 rows = 0.75.
    loss = -(1.2 - 1.5) / 2 = 0.15; clip_fraction = 1 token of 2 = 0.5."""
    logp = [[-1.0], [-1.0]]
    old = torch.tensor(logp) - math.log(1.5)
    x = LossInputs(
        token_logp=leaf(logp),
        ref_token_logp=torch.tensor(logp),
        mask=torch.ones(2, 1),
        old_token_logp=old,
        groups=torch.tensor([[0, 1]]),
        target=torch.tensor([[0.75, 0.25]]),
    )
    out = grpo_advantage_loss(x, LossConfig(clip_eps=0.2, beta_kl=0.0))
    assert out.loss.item() == pytest.approx(0.15, rel=1e-5)
    out.loss.backward()
    assert x.token_logp.grad[0, 0].item() == 0.0
    assert x.token_logp.grad[1, 0].item() == pytest.approx(0.75, rel=1e-5)
    assert out.metrics["clip_fraction"] == 0.5


def test_k3_kl_value_and_gradient_by_hand() -> None:
    """Uniform d -> A = 0, so the loss is beta_kl * mean k3 KL. With logp = -1 on both rows:
    row 0: ref - logp = ln2  -> k3 = e^ln2 - ln2 - 1 = 1 - ln2 = 0.306853;
    row 1: ref - logp = -ln2 -> k3 = 1/2 + ln2 - 1 = ln2 - 1/2 = 0.193147;
    mean = 0.5 / 2 = 0.25 -> loss = 0.04 * 0.25 = 0.01.
    d k3 / d logp = 1 - exp(ref - logp): row 0 1 - 2 = -1, row 1 1 - 1/2 = 0.5;
    times beta_kl / 2 rows -> grads -0.02 and 0.01 (both pull logp towards ref)."""
    x = LossInputs(
        token_logp=leaf([[-1.0], [-1.0]]),
        ref_token_logp=torch.tensor([[-1.0 + LN2], [-1.0 - LN2]]),
        mask=torch.ones(2, 1),
        groups=torch.tensor([[0, 1]]),
        target=torch.tensor([[0.5, 0.5]]),
    )
    out = grpo_advantage_loss(x, LossConfig(beta_kl=0.04))
    assert out.loss.item() == pytest.approx(0.01, rel=1e-5)
    assert out.metrics["kl"] == pytest.approx(0.25, rel=1e-5)
    assert out.metrics["zero_variance_groups"] == 1.0 and out.metrics["adv_abs_mean"] == 0.0
    out.loss.backward()
    assert x.token_logp.grad.flatten().tolist() == pytest.approx([-0.02, 0.01], rel=1e-5)


def test_k3_kl_turns_linear_past_its_cap_by_hand() -> None:
    """Uniform d -> A = 0, loss = beta_kl * mean k3. logp = -1; row 0 ref - logp = 6 (past the
    cap 4), row 1 ref - logp = 1 (inside it).
    row 0, tangent at c = 4: e^4 - 4 - 1 + (e^4 - 1)(6 - 4) = 49.598150 + 107.196300 = 156.794450
      (plain k3 would be e^6 - 7 = 396.428793); d k3 / d logp = -(e^4 - 1) = -53.598150;
    row 1, plain k3: e - 2 = 0.718282; d k3 / d logp = 1 - e = -1.718282.
    beta_kl 0.04 over 2 rows: loss = 0.02 (156.794450 + 0.718282) = 3.150255; grads
    0.02 x (-53.598150, -1.718282) = (-1.071963, -0.0343656). One of two tokens is capped."""
    def inputs() -> LossInputs:
        return LossInputs(
            token_logp=leaf([[-1.0], [-1.0]]),
            ref_token_logp=torch.tensor([[5.0], [0.0]]),
            mask=torch.ones(2, 1),
            groups=torch.tensor([[0, 1]]),
            target=torch.tensor([[0.5, 0.5]]),
        )

    x = inputs()
    out = grpo_advantage_loss(x, LossConfig(beta_kl=0.04, kl_cap=4.0))
    assert out.loss.item() == pytest.approx(3.150255, rel=1e-5)
    assert out.metrics["kl_capped_fraction"] == 0.5
    out.loss.backward()
    assert x.token_logp.grad.flatten().tolist() == pytest.approx([-1.071963, -0.0343656], rel=1e-5)
    plain = grpo_advantage_loss(inputs(), LossConfig(beta_kl=0.04, kl_cap=0.0))
    assert plain.loss.item() == pytest.approx(0.02 * (396.428793 + 0.718282), rel=1e-5)
    assert plain.metrics["kl_capped_fraction"] == 0.0
    with pytest.raises(ValueError, match="kl_cap"):
        LossConfig(kl_cap=-1.0)


def test_listwise_kl_value_and_gradient_by_hand() -> None:
    """beta 0.5. Group 0: l = [0, 2 ln2, 4 ln2] -> beta l = [0, ln2, ln4] -> q = [1, 2, 4] / 7;
    d = [4, 2, 1] / 7 -> KL(d || q) = 4/7 ln4 + 2/7 ln1 + 1/7 ln(1/4) = 3/7 ln4 = 0.594126.
    Group 1: l = 0, d uniform -> q = d, KL 0. Loss = mean over G = 2 groups = 0.297063.
    Gradient beta (q - d) / G: group 0 0.5 [-3/7, 0, 3/7] / 2 = [-0.107143, 0, 0.107143];
    group 1 zero."""
    ratio = torch.tensor([[0.0, 2 * LN2, 4 * LN2], [0.0, 0.0, 0.0]], requires_grad=True)
    d = torch.tensor([[4 / 7, 2 / 7, 1 / 7], [1 / 3, 1 / 3, 1 / 3]])
    loss, q = listwise_kl(ratio, d, beta=0.5)
    assert loss.item() == pytest.approx(3 / 7 * math.log(4) / 2, rel=1e-5)
    assert q[0].tolist() == pytest.approx([1 / 7, 2 / 7, 4 / 7], rel=1e-5)
    loss.backward()
    expected = torch.tensor([[-0.107143, 0.0, 0.107143], [0.0, 0.0, 0.0]])
    assert torch.allclose(ratio.grad, expected, atol=1e-6)
    assert torch.allclose(ratio.grad, 0.5 * (q - d).detach() / 2, atol=1e-7)


def test_listwise_kl_treats_zero_target_mass_as_zero() -> None:
    """d = [1, 0, 0], q = [1, 2, 4] / 7: KL = 1 * ln(1 / (1/7)) = ln 7 = 1.945910; the two
    0 * log 0 terms are 0, not NaN."""
    ratio = torch.tensor([[0.0, LN2, 2 * LN2]])
    loss, _ = listwise_kl(ratio, torch.tensor([[1.0, 0.0, 0.0]]), beta=1.0)
    assert loss.item() == pytest.approx(math.log(7), rel=1e-6)


def distribution_inputs() -> LossInputs:
    """Rows 0..2 with per-token logp - ref: [0, pad], [2ln2 + 0.5, 2ln2 - 0.5], [4ln2, 4ln2]
    -> mean-token l = [0, 2 ln2, 4 ln2]; summed l = [0, 4 ln2, 8 ln2]."""
    ref = torch.tensor([[-1.0, PAD], [-2.0, -2.0], [-3.0, -1.0]])
    delta = torch.tensor([[0.0, 0.0], [2 * LN2 + 0.5, 2 * LN2 - 0.5], [4 * LN2, 4 * LN2]])
    return LossInputs(
        token_logp=(ref + delta).requires_grad_(),
        ref_token_logp=ref,
        mask=torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]),
        groups=torch.tensor([[0, 1, 2]]),
        target=torch.tensor([[4 / 7, 2 / 7, 1 / 7]]),
    )


def test_grpo_distribution_loss_from_tokens_by_hand() -> None:
    """beta 0.5, l = [0, 2 ln2, 4 ln2] -> q = [1, 2, 4] / 7, d = [4, 2, 1] / 7, G = 1:
    loss = 3/7 ln4 = 0.594126; dL/dl = 0.5 (q - d) = [-3/14, 0, 3/14], spread over each
    row's tokens by the mean: row 0 -0.214286 (1 token), row 1 0, row 2 0.107143 per token.
    log_ratio metric: token log-ratios sum to 0 + 4 ln2 + 8 ln2 = 12 ln2 over 5 tokens = 1.663553.
    top-1: argmax q = 2, argmax d = 0 -> 0."""
    x = distribution_inputs()
    out = grpo_distribution_loss(x, LossConfig(beta=0.5))
    assert out.loss.item() == pytest.approx(3 / 7 * math.log(4), rel=1e-5)
    assert out.metrics["log_ratio"] == pytest.approx(12 * LN2 / 5, rel=1e-5)
    assert out.metrics["top1_agreement"] == 0.0
    out.loss.backward()
    expected = torch.tensor([[-3 / 14, 0.0], [0.0, 0.0], [3 / 28, 3 / 28]])
    assert torch.allclose(x.token_logp.grad, expected, atol=1e-6)


def test_grpo_distribution_loss_summed_log_ratio() -> None:
    """length_norm "none": l = [0, 4 ln2, 8 ln2], beta 0.5 -> q = [1, 4, 16] / 21, so
    KL(d || q) = 4/7 ln(12) + 2/7 ln(3/2) + 1/7 ln(3/16) = 1.295029."""
    out = grpo_distribution_loss(distribution_inputs(), LossConfig(beta=0.5, length_norm="none"))
    expected = 4 / 7 * math.log(12) + 2 / 7 * math.log(1.5) + 1 / 7 * math.log(3 / 16)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["grpo-advantage", "grpo-distribution"])
def test_uniform_scores_give_zero_gradient_when_policy_equals_reference(name: str) -> None:
    """Tied scores -> d uniform. advantage: A = 0 and the k3 gradient 1 - exp(ref - logp) = 0
    at logp = ref. distribution: l = 0 -> q uniform = d -> beta (q - d) = 0."""
    d = listwise_target([0.3, 0.3, 0.3], tau=0.5)
    logp = torch.tensor([[-1.3, -0.2], [-0.7, -2.1], [-0.4, PAD]])
    x = LossInputs(
        token_logp=logp.clone().requires_grad_(),
        ref_token_logp=logp,
        mask=torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]),
        groups=torch.tensor([[0, 1, 2]]),
        target=torch.tensor([d]),
    )
    LOSSES[name](x, LossConfig()).loss.backward()
    assert torch.allclose(x.token_logp.grad, torch.zeros(3, 2), atol=1e-7)


def test_zero_variance_groups_are_counted() -> None:
    """Two groups: [0.5, 0.5] is uniform, [0.75, 0.25] is not -> 1."""
    x = LossInputs(
        token_logp=leaf([[-1.0]] * 4),
        ref_token_logp=torch.full((4, 1), -1.0),
        mask=torch.ones(4, 1),
        groups=torch.tensor([[0, 1], [2, 3]]),
        target=torch.tensor([[0.5, 0.5], [0.75, 0.25]]),
    )
    assert grpo_advantage_loss(x, LossConfig()).metrics["zero_variance_groups"] == 1.0


def test_losses_registry_and_errors() -> None:
    assert set(LOSSES) == {"dpo", "grpo-advantage", "grpo-distribution"}
    with pytest.raises(ValueError, match="length_norm"):
        LossConfig(length_norm="tokens")
    with pytest.raises(ValueError, match="beta"):
        LossConfig(beta=0.0)
    with pytest.raises(ValueError, match="grpo-distribution"):
        grpo_distribution_loss(distribution_inputs(), LossConfig(length_norm="token"))
    with pytest.raises(ValueError, match="grpo-advantage"):
        grpo_advantage_loss(distribution_inputs(), LossConfig(length_norm="none"))
    with pytest.raises(ValueError, match="pairs"):
        dpo_loss(distribution_inputs(), LossConfig())
    bad = distribution_inputs()
    bad.target = torch.tensor([[0.5, 0.5, 0.5]])
    with pytest.raises(ValueError, match="distribution"):
        grpo_distribution_loss(bad, LossConfig())
    bad.groups, bad.target = torch.tensor([[0, 1, 3]]), torch.tensor([[0.2, 0.3, 0.5]])
    with pytest.raises(ValueError, match="outside"):
        grpo_distribution_loss(bad, LossConfig())


def test_algorithm_package_imports_no_hardware_framework() -> None:
    """Layer direction (STYLE.md): the losses know nothing about models or devices."""
    code = (
        "import sys, edge_pu.algo.losses;"
        "print(sorted(m for m in ('transformers', 'peft', 'mlx', 'bitsandbytes')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
