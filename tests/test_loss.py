"""surrogate_loss and importance_weights on hand examples, and data-parallel split invariance."""

import math

import pytest
import torch

from learner.loss import LossStats, importance_weights, surrogate_loss


def _batch(seed=0, B=4, T=6):
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    sampler = logp.detach() + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    lengths = [6, 3, 1, 4]
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    return logp, adv, sampler, mask


def test_importance_weights_truncate_and_detach():
    learner = torch.tensor([[0.0, 1.0, -1.0, 50.0]], requires_grad=True)
    sampler = torch.zeros(1, 4)
    w = importance_weights(learner, sampler, is_cap=2.0)
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, math.exp(-1.0), 2.0]]))
    uncapped = importance_weights(learner[:, :3], sampler[:, :3], is_cap=None)
    torch.testing.assert_close(uncapped, torch.tensor([[1.0, math.e, math.exp(-1.0)]]))


def test_token_mean_hand_example():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = surrogate_loss(logp, adv, logp.detach(), mask, aggregation="token_mean")
    # −Σ A·logp over masked tokens / 4, w ≡ 1.
    expected = -(1.0 * -1.0 + -2.0 * -2.0 + 0.5 * -3.0 + 4.0 * -0.5) / 4
    assert loss.item() == pytest.approx(expected)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -adv * mask / 4)
    assert stats == LossStats(is_truncated_frac=0.0, is_weight_mean=1.0, mismatch=0.0)


def test_seq_mean_hand_example():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, _ = surrogate_loss(logp, adv, logp.detach(), mask, aggregation="seq_mean")
    seq0 = -(1.0 * -1.0 + -2.0 * -2.0 + 0.5 * -3.0) / 3
    seq1 = -(4.0 * -0.5) / 1
    assert loss.item() == pytest.approx((seq0 + seq1) / 2)


def test_truncation_is_counted_and_applied():
    logp = torch.zeros(1, 4, requires_grad=True)
    sampler = torch.tensor([[0.0, -1.0, -0.1, 3.0]])  # ratios 1, e, 1.105, e^-3
    adv = torch.ones(1, 4)
    mask = torch.ones(1, 4)
    loss, stats = surrogate_loss(logp, adv, sampler, mask, is_cap=2.0)
    assert stats.is_truncated_frac == 0.25
    w = torch.tensor([1.0, 2.0, math.exp(0.1), math.exp(-3.0)])
    assert stats.is_weight_mean == pytest.approx(w.mean().item())
    assert stats.mismatch == pytest.approx((0 + 1 + 0.1 + 3) / 4)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -w[None] / 4)


def test_padding_with_infinities_is_harmless():
    logp = torch.tensor([[-1.0, -torch.inf]], requires_grad=True)
    sampler = torch.tensor([[-1.0, torch.nan]])
    adv = torch.tensor([[2.0, torch.nan]])
    loss, stats = surrogate_loss(logp, adv, sampler, torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(2.0)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-2.0, 0.0]]))
    assert math.isfinite(stats.mismatch) and math.isfinite(stats.is_weight_mean)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_split_batch_with_global_normaliser_sums_to_full_batch(aggregation):
    logp, adv, sampler, mask = _batch()
    full, _ = surrogate_loss(logp, adv, sampler, mask, aggregation=aggregation)
    (full_grad,) = torch.autograd.grad(full, logp)

    global_n = mask.sum().item() if aggregation == "token_mean" else mask.shape[0]
    shard_losses, shard_grad = [], torch.zeros_like(logp)
    for rows in (slice(0, 1), slice(1, 4)):
        part, _ = surrogate_loss(
            logp[rows],
            adv[rows],
            sampler[rows],
            mask[rows],
            aggregation=aggregation,
            normaliser=global_n,
        )
        shard_grad += torch.autograd.grad(part, logp)[0]
        shard_losses.append(part)
    torch.testing.assert_close(sum(shard_losses), full)
    torch.testing.assert_close(shard_grad, full_grad)


def test_bf16_logps_compute_in_float32():
    logp, adv, sampler, mask = _batch()
    loss, _ = surrogate_loss(logp.detach().bfloat16(), adv, sampler.bfloat16(), mask)
    assert loss.dtype == torch.float32


def test_invalid_arguments():
    logp, adv, sampler, mask = _batch()
    with pytest.raises(ValueError, match="token_mean.*seq_mean"):
        surrogate_loss(logp, adv, sampler, mask, aggregation="sum")
    with pytest.raises(ValueError, match="shape"):
        surrogate_loss(logp, adv[:, :2], sampler, mask)
    with pytest.raises(ValueError, match="is_cap"):
        surrogate_loss(logp, adv, sampler, mask, is_cap=0.0)
