"""token_advantages: hand examples, masking, clamping, dtypes and the fast suffix-sum scan."""

import math

import pytest
import torch

from learner.advantages import (
    AdvantageStats,
    discounted_future_sum,
    token_advantages,
    token_advantages_with_stats,
)
from learner.divergences import DIVERGENCES, get_divergence

F32_MAX = torch.finfo(torch.float32).max


def reference_future_sum(x_BT, mask_BT, discount):
    """Slow O(B·T²) reference: S_t = Σ_{k>t, mask_k} γ^{k−t} x_k."""
    out = torch.zeros_like(x_BT)
    B, T = x_BT.shape
    for b in range(B):
        for t in range(T):
            for k in range(t + 1, T):
                if mask_BT[b, k]:
                    out[b, t] += discount ** (k - t) * x_BT[b, k]
    return out


@pytest.mark.parametrize("discount", [0.0, 0.3, 0.9, 1.0])
def test_scan_matches_reference(discount):
    gen = torch.Generator().manual_seed(0)
    x_BT = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    mask_BT = torch.rand(3, 9, generator=gen) > 0.3
    fast = discounted_future_sum(torch.where(mask_BT, x_BT, 0.0), discount)
    torch.testing.assert_close(fast, reference_future_sum(x_BT, mask_BT, discount))


@pytest.mark.parametrize("discount", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("estimator", ["opd_plus", "opd"])
def test_hand_example_reverse_kl(estimator, discount):
    # reverse KL: g(ell) = ell, f'(ell) = ell + 1.
    ell = torch.tensor([[0.5, -1.0, 2.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    logq = torch.full_like(ell, -2.0)
    adv = token_advantages(
        logq + ell, logq, mask, divergence="reverse_kl", estimator=estimator, discount=discount
    )
    bonus = 1.0 if estimator == "opd_plus" else 0.0
    g = discount
    expected = -torch.tensor(
        [[0.5 + bonus + g * -1.0 + g**2 * 2.0, -1.0 + bonus + g * 2.0, 2.0 + bonus, 0.0]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(adv, expected)


def test_zero_discount_is_minus_immediate_cost():
    gen = torch.Generator().manual_seed(1)
    logp, logq = torch.randn(2, 2, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 6)
    for div in DIVERGENCES.values():
        adv = token_advantages(logp, logq, mask, divergence=div, discount=0.0)
        torch.testing.assert_close(adv, -div.grad_cost(logp - logq))
        adv = token_advantages(logp, logq, mask, divergence=div, estimator="opd", discount=0.0)
        torch.testing.assert_close(adv, -div.cost(logp - logq))


def test_masked_tokens_are_zero_and_add_nothing():
    gen = torch.Generator().manual_seed(2)
    logp, logq = torch.randn(2, 2, 7, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])
    garbage_p = torch.where(mask.bool(), logp, torch.nan)
    garbage_q = torch.where(mask.bool(), logq, -torch.inf)
    for discount in (0.0, 0.7, 1.0):
        clean = token_advantages(logp, logq, mask, divergence="js", discount=discount)
        dirty = token_advantages(garbage_p, garbage_q, mask, divergence="js", discount=discount)
        torch.testing.assert_close(clean, dirty)
        assert (dirty[mask == 0] == 0).all()
        # Changing a masked token's log-probs changes nothing.
        moved = token_advantages(
            logp, logq + 5 * (1 - mask), mask, divergence="js", discount=discount
        )
        torch.testing.assert_close(moved, clean)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_extreme_log_ratios_are_finite_when_clamped(name):
    extremes = [50.0, -50.0, 1e30, -1e30, F32_MAX, -F32_MAX, 0.1, -0.1]
    logq = torch.zeros(1, len(extremes))
    logp = torch.tensor([extremes])
    for discount in (0.0, 1.0):
        adv, stats = token_advantages_with_stats(
            logp, logq, torch.ones_like(logp), divergence=name, discount=discount, ratio_clip=10.0
        )
        assert torch.isfinite(adv).all()
        assert stats.clamped_frac == pytest.approx(6 / 8)
        assert math.isfinite(stats.max_abs_advantage)


def test_teacher_minus_infinity_is_clamped():
    logp = torch.tensor([[-1.0, -2.0]])
    logq = torch.tensor([[-torch.inf, -2.0]])
    adv, stats = token_advantages_with_stats(
        logp, logq, torch.ones(1, 2), divergence="forward_kl", discount=1.0
    )
    assert torch.isfinite(adv).all()
    assert stats.clamped_frac == 0.5


def test_stats_hand_example():
    # 4 masked tokens, two beyond the clip; reverse KL so cost = clamped ell.
    logp = torch.tensor([[12.0, -0.5, 0.5, -20.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    adv, stats = token_advantages_with_stats(
        logp, torch.zeros_like(logp), mask, divergence="reverse_kl", ratio_clip=10.0
    )
    assert isinstance(stats, AdvantageStats)
    assert stats.clamped_frac == 0.5
    assert stats.mean_ell == pytest.approx((10 - 0.5 + 0.5 - 10) / 4)
    assert stats.divergence_estimate == pytest.approx(0.0)
    assert stats.max_abs_advantage == pytest.approx(11.0)
    torch.testing.assert_close(
        adv, -torch.tensor([[11.0, 0.5, 1.5, -9.0, 0.0]], dtype=torch.float64)
    )


def test_no_clip_passes_large_ratios_through():
    logp = torch.tensor([[30.0]], dtype=torch.float64)
    adv, stats = token_advantages_with_stats(
        logp, torch.zeros_like(logp), torch.ones(1, 1), divergence="reverse_kl", ratio_clip=None
    )
    assert adv.item() == -31.0
    assert stats.clamped_frac == 0.0


def test_dtypes():
    logp = torch.randn(2, 5)
    logq = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    bf16 = token_advantages(logp.bfloat16(), logq.bfloat16(), mask, divergence="js")
    assert bf16.dtype == torch.float32
    f64 = token_advantages(logp.double(), logq.double(), mask, divergence="js")
    assert f64.dtype == torch.float64
    mixed = token_advantages(logp.bfloat16(), logq.double(), mask, divergence="js")
    assert mixed.dtype == torch.float64


def test_advantages_are_detached():
    logp = torch.randn(2, 4, requires_grad=True)
    adv = token_advantages(logp, torch.randn(2, 4), torch.ones(2, 4), divergence="js")
    assert not adv.requires_grad


def test_divergence_by_name_or_instance():
    logp, logq = torch.randn(2, 2, 4, dtype=torch.float64)
    mask = torch.ones(2, 4)
    by_name = token_advantages(logp, logq, mask, divergence="hellinger", discount=1.0)
    by_obj = token_advantages(
        logp, logq, mask, divergence=get_divergence("hellinger"), discount=1.0
    )
    torch.testing.assert_close(by_name, by_obj)


def test_student_equal_to_teacher():
    logp = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.ones(3, 5)
    for div in [*DIVERGENCES.values(), get_divergence("alpha", alpha=0.5)]:
        # The OPD cost g(1) = 0 vanishes; the OPD+ cost is the constant f'(1), whose expected
        # gradient is zero (tests/test_estimator_exact.py checks that exactly).
        opd = token_advantages(logp, logp, mask, divergence=div, estimator="opd", discount=1.0)
        assert opd.abs().max().item() == 0.0
        plus = token_advantages(logp, logp, mask, divergence=div, discount=1.0)
        torch.testing.assert_close(
            plus, torch.full_like(plus, -div.grad_cost(torch.zeros(()).double()).item())
        )


def test_invalid_arguments():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="opd_plus.*opd"):
        token_advantages(x, x, x, divergence="js", estimator="grpo")
    with pytest.raises(ValueError, match="valid names"):
        token_advantages(x, x, x, divergence="nope")
    with pytest.raises(ValueError, match="discount"):
        token_advantages(x, x, x, divergence="js", discount=1.5)
    with pytest.raises(ValueError, match="shape"):
        token_advantages(x, torch.zeros(1, 3), x, divergence="js")
    with pytest.raises(ValueError, match="ratio_clip"):
        token_advantages(x, x, x, divergence="js", ratio_clip=0.0)


def test_empty_mask_stats():
    x = torch.zeros(2, 3)
    adv, stats = token_advantages_with_stats(x, x, x, divergence="js")
    assert (adv == 0).all()
    assert stats == AdvantageStats(0.0, 0.0, 0.0, 0.0)
