"""The surrogate loss whose gradient is the OPD/OPD+ estimator (docs/math.md §3, §7).

Per token, with detached advantage A_t and detached truncated importance weight w_t,

    loss_t = −A_t · w_t · log π_θ(y_t|s_t),    w_t = min(exp(logp_learner_t − logp_sampler_t), is_cap)

so ∇loss_t = −A_t · w_t · ∇log π_θ(y_t|s_t). w corrects for stale or numerically mismatched
samples (w ≡ 1 when the sampler is the current policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.advantages import compute_dtype, keep_mask

AGGREGATIONS = ("token_mean", "seq_mean")


@dataclass(frozen=True)
class LossStats:
    """Batch diagnostics over masked tokens.

    is_truncated_frac: fraction of tokens whose importance ratio exceeded is_cap.
    is_weight_mean: mean of the truncated weights w_t.
    mismatch: mean |logp_learner − logp_sampler|.
    """

    is_truncated_frac: float
    is_weight_mean: float
    mismatch: float


def importance_weights(
    logp_learner_BT: Tensor, logp_sampler_BT: Tensor, *, is_cap: float | None = 2.0
) -> Tensor:
    """Detached w_BT = min(exp(logp_learner − logp_sampler), is_cap); [B, T] → [B, T].

    is_cap=None disables truncation. Computed in at least float32.
    """
    dtype = compute_dtype(logp_learner_BT, logp_sampler_BT)
    with torch.no_grad():
        delta_BT = logp_learner_BT.detach().to(dtype) - logp_sampler_BT.detach().to(dtype)
        if is_cap is not None:
            # Truncating in log space is the same min() but cannot overflow to inf first.
            delta_BT = delta_BT.clamp(max=math.log(is_cap))
        return delta_BT.exp()


def surrogate_loss(
    logp_learner_BT: Tensor,
    advantages_BT: Tensor,
    logp_sampler_BT: Tensor,
    mask_BT: Tensor,
    *,
    is_cap: float | None = 2.0,
    aggregation: str = "token_mean",
    normaliser: float | Tensor | None = None,
    student_mask_BT: Tensor | None = None,
) -> tuple[Tensor, LossStats]:
    """Scalar surrogate loss and its `LossStats`.

    logp_learner_BT: [B, T] log π_θ of the sampled tokens, with gradient.
    advantages_BT, logp_sampler_BT: [B, T], used detached.
    mask_BT: [B, T], nonzero on response tokens; other tokens contribute nothing.
    aggregation:
        "token_mean": Σ_{b,t} m·loss_t / N, N = number of masked tokens.
        "seq_mean":   Σ_b (Σ_t m·loss_t / n_b) / N, n_b = masked tokens of sequence b and
                      N = number of sequences with n_b > 0.
    normaliser: overrides N. For a batch split across data-parallel shards pass the global N;
        then the shards' losses (and gradients) sum to the full batch's.
    student_mask_BT: optional [B, T], 0 at an episode's environment tokens: they get no score
        term and are not counted in N or n_b (docs/math.md §10). None: all masked tokens count.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if is_cap is not None and not is_cap > 0:
        raise ValueError(f"is_cap must be positive or None, got {is_cap}")
    shapes = {tuple(t.shape) for t in (logp_learner_BT, advantages_BT, logp_sampler_BT, mask_BT)}
    if len(shapes) != 1:
        raise ValueError(f"all inputs must share one [B, T] shape, got {sorted(shapes)}")

    dtype = compute_dtype(logp_learner_BT, logp_sampler_BT)
    keep_BT = keep_mask(mask_BT, student_mask_BT)
    w_BT = importance_weights(logp_learner_BT, logp_sampler_BT, is_cap=is_cap)
    coef_BT = torch.where(keep_BT, advantages_BT.detach().to(dtype) * w_BT, 0.0)
    # where() rather than a multiply by the mask: padding log-probs may be -inf, and 0·inf = NaN.
    loss_BT = torch.where(keep_BT, -coef_BT * logp_learner_BT.to(dtype), 0.0)

    if aggregation == "token_mean":
        denom = keep_BT.sum().clamp(min=1) if normaliser is None else normaliser
        loss = loss_BT.sum() / denom
    else:
        n_B = keep_BT.sum(-1)
        denom = (n_B > 0).sum().clamp(min=1) if normaliser is None else normaliser
        loss = (loss_BT.sum(-1) / n_B.clamp(min=1)).sum() / denom

    return loss, _loss_stats(logp_learner_BT, logp_sampler_BT, w_BT, keep_BT, is_cap)


def _loss_stats(
    logp_learner_BT: Tensor,
    logp_sampler_BT: Tensor,
    w_BT: Tensor,
    keep_BT: Tensor,
    is_cap: float | None,
) -> LossStats:
    with torch.no_grad():
        delta_BT = logp_learner_BT.detach().to(w_BT.dtype) - logp_sampler_BT.to(w_BT.dtype)
        delta_BT = torch.where(keep_BT, delta_BT, 0.0)
        truncated_BT = torch.zeros_like(keep_BT)
        if is_cap is not None:
            truncated_BT = delta_BT > math.log(is_cap)
        n = keep_BT.sum().clamp(min=1).to(w_BT.dtype)
        terms = [
            truncated_BT.sum().to(w_BT.dtype) / n,
            torch.where(keep_BT, w_BT, 0.0).sum() / n,
            delta_BT.abs().sum() / n,
        ]
        return LossStats(*torch.stack(terms).tolist())
