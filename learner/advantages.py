"""Per-token OPD / OPD+ advantages (docs/math.md §2, §3).

For a response sampled from the student, with ell_t = log π_student(y_t|s_t) − log π_teacher(y_t|s_t)
and discount γ ∈ [0, 1],

    A_t = −( c_t + Σ_{k>t} γ^{k−t} · g(r_k) ),   c_t = f'(r_t) (OPD+)  or  g(r_t) (OPD).

With γ = 1 the OPD+ estimator E[Σ_t −A_t ∇log π_θ(y_t|s_t)] equals ∇ E_{y~π_θ}[Σ_t g(r_t)]
exactly; with γ = 0 it equals Σ_t E_{s_t}[∇ D_f(π_θ(·|s_t) ‖ π_T(·|s_t))] with the state
distribution held fixed. OPD (stop-gradient) drops r·g'(r) and is unbiased only for reverse KL.
Advantages are never normalised per batch: that would erase what separates OPD from OPD+.

Episodes (docs/math.md §10): with `student_mask_BT` (1 at the student's tokens, 0 at the
environment's), the sums run over student tokens only — an environment token has no cost, no
score term and takes no step of γ (k − t counts the student tokens in (t, k]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from learner.divergences import Divergence, get_divergence

ESTIMATORS = ("opd_plus", "opd")


@dataclass(frozen=True)
class AdvantageStats:
    """Batch diagnostics, all over masked (response) tokens, the student's only in an episode.

    clamped_frac: fraction of tokens whose |ell| exceeded ratio_clip.
    max_abs_advantage: max |A_t|.
    mean_ell: mean ell_t after clamping; its expectation is KL(student‖teacher) per token.
    divergence_estimate: mean g(r_t) after clamping; unbiased for the per-token D_f.
    """

    clamped_frac: float
    max_abs_advantage: float
    mean_ell: float
    divergence_estimate: float


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The promoted floating dtype of the inputs, at least float32."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or dtype.itemsize < 4:
        return torch.float32
    return dtype


def keep_mask(mask_BT: Tensor, student_mask_BT: Tensor | None = None) -> Tensor:
    """Bool [B, T]: the positions that carry a cost and a score term, mask ∧ student mask.

    mask_BT: nonzero on response (trajectory) tokens. student_mask_BT: optional, nonzero at the
    student's tokens and 0 at an environment's (docs/math.md §10); None: every response token
    is the student's.
    """
    keep_BT = mask_BT != 0
    if student_mask_BT is None:
        return keep_BT
    if student_mask_BT.shape != mask_BT.shape:
        raise ValueError(
            f"student_mask_BT has shape {tuple(student_mask_BT.shape)}, "
            f"expected the mask's {tuple(mask_BT.shape)}"
        )
    return keep_BT & (student_mask_BT != 0)


def discounted_future_sum(
    x_BT: Tensor, discount: float, *, steps_BT: Tensor | None = None
) -> Tensor:
    """S_t = Σ_{k>t} γ^{n(t,k)} · x_k along the last dim; shape [B, T] → [B, T], O(B·T).

    steps_BT None: n(t, k) = k − t counts positions, so zeros in x (masked tokens) contribute
    nothing but still take a step of discount.
    steps_BT: bool [B, T], the positions that count (an episode's student tokens): n(t, k) is the
    number of them in (t, k], and any other position neither contributes nor takes a step.
    """
    out_BT = torch.zeros_like(x_BT)
    if discount == 0 or x_BT.shape[-1] < 2:
        return out_BT
    if steps_BT is not None:
        return _stepped_future_sum(x_BT, discount, steps_BT)
    if discount == 1:
        # Reverse cumulative sum shifted left by one, so position t sums k > t without the
        # rounding of subtracting x_t back out.
        out_BT[..., :-1] = x_BT.flip(-1).cumsum(-1).flip(-1)[..., 1:]
        return out_BT
    for t in range(x_BT.shape[-1] - 2, -1, -1):
        out_BT[..., t] = discount * (x_BT[..., t + 1] + out_BT[..., t + 1])
    return out_BT


def _stepped_future_sum(x_BT: Tensor, discount: float, steps_BT: Tensor) -> Tensor:
    """`discounted_future_sum` where only the positions in steps_BT count (its docstring)."""
    if steps_BT.shape != x_BT.shape:
        raise ValueError(f"steps_BT {tuple(steps_BT.shape)} does not match x {tuple(x_BT.shape)}")
    x_BT = torch.where(steps_BT, x_BT, 0.0)
    if discount == 1:  # every exponent is 1: skipping positions changes nothing
        return discounted_future_sum(x_BT, 1.0)
    out_BT = torch.zeros_like(x_BT)
    # carry = x_j + S_j of the next counted position j (0 past the last): a position that does
    # not count leaves it unchanged, so the discount steps only at counted positions.
    carry = torch.zeros_like(x_BT[..., 0])
    for t in range(x_BT.shape[-1] - 1, -1, -1):
        out_BT[..., t] = discount * carry
        carry = torch.where(steps_BT[..., t], x_BT[..., t] + out_BT[..., t], carry)
    return out_BT


def token_advantages(
    logp_student_BT: Tensor,
    logp_teacher_BT: Tensor,
    mask_BT: Tensor,
    *,
    divergence: Divergence | str,
    estimator: str = "opd_plus",
    discount: float = 0.0,
    ratio_clip: float | None = 10.0,
    center_cost: bool = False,
    student_mask_BT: Tensor | None = None,
) -> Tensor:
    """Detached advantages A_BT [B, T] (equation in the module docstring).

    logp_student_BT, logp_teacher_BT: [B, T] log-probs of the sampled tokens.
    mask_BT: [B, T], nonzero on response tokens; elsewhere A is 0 and the token adds nothing to
        any suffix sum (its log-probs may be garbage, e.g. -inf or NaN).
    divergence: a `Divergence` or a name for `get_divergence`.
    estimator: "opd_plus" (c_t = f'(r_t)) or "opd" (c_t = g(r_t)).
    discount: γ ∈ [0, 1].
    ratio_clip: ell is clamped to ±ratio_clip before any exp; None disables clamping.
    center_cost: OPD+ only — subtract the constant f'(1) from every immediate cost,
        c_t = f'(r_t) − f'(1). A constant times E[∇log π] is zero, so the expected gradient is
        unchanged while the variance is not: uncentred reverse-KL OPD+ (cost ell + 1) pushes
        every sampled token down by 1 in a single sample; centred it is the usual ell cost.
        f'(1) = 0 for every divergence here except reverse and forward KL.
    student_mask_BT: optional [B, T], nonzero at the student's tokens, 0 at an environment's
        (an episode, docs/math.md §10): those get A = 0, add no cost to any sum and take no
        step of γ. None: every masked token is the student's and γ counts positions, as
        before episodes existed (the same numbers as all ones for a contiguous mask).
    Returns A_BT in the inputs' promoted dtype, upcast to float32 if narrower.
    """
    terms = _advantage_terms(
        logp_student_BT,
        logp_teacher_BT,
        mask_BT,
        divergence=divergence,
        estimator=estimator,
        discount=discount,
        ratio_clip=ratio_clip,
        center_cost=center_cost,
        student_mask_BT=student_mask_BT,
    )
    return terms[0]


def token_advantages_with_stats(
    logp_student_BT: Tensor,
    logp_teacher_BT: Tensor,
    mask_BT: Tensor,
    *,
    divergence: Divergence | str,
    estimator: str = "opd_plus",
    discount: float = 0.0,
    ratio_clip: float | None = 10.0,
    center_cost: bool = False,
    student_mask_BT: Tensor | None = None,
) -> tuple[Tensor, AdvantageStats]:
    """`token_advantages` plus its `AdvantageStats` (one host sync for the stats)."""
    adv_BT, ell_BT, cost_BT, clamped_BT, keep_BT = _advantage_terms(
        logp_student_BT,
        logp_teacher_BT,
        mask_BT,
        divergence,
        estimator,
        discount,
        ratio_clip,
        center_cost,
        student_mask_BT,
    )
    n = keep_BT.sum().clamp(min=1).to(adv_BT.dtype)
    max_abs = adv_BT.abs().amax() if adv_BT.numel() else adv_BT.new_zeros(())
    terms = [clamped_BT.sum().to(adv_BT.dtype) / n, max_abs, ell_BT.sum() / n, cost_BT.sum() / n]
    return adv_BT, AdvantageStats(*torch.stack(terms).tolist())


def _advantage_terms(
    logp_student_BT: Tensor,
    logp_teacher_BT: Tensor,
    mask_BT: Tensor,
    divergence: Divergence | str,
    estimator: str,
    discount: float,
    ratio_clip: float | None,
    center_cost: bool,
    student_mask_BT: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(A_BT, clamped ell_BT, g_BT, clamped_BT, keep_BT), all zero off the mask."""
    div = get_divergence(divergence)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    if ratio_clip is not None and not ratio_clip > 0:
        raise ValueError(f"ratio_clip must be positive or None, got {ratio_clip}")
    if not logp_student_BT.shape == logp_teacher_BT.shape == mask_BT.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(logp_student_BT.shape)}, "
            f"teacher {tuple(logp_teacher_BT.shape)}, mask {tuple(mask_BT.shape)}"
        )

    dtype = compute_dtype(logp_student_BT, logp_teacher_BT)
    with torch.no_grad():
        keep_BT = keep_mask(mask_BT, student_mask_BT)
        # Without a student mask γ counts positions (as always); with one, student tokens only.
        steps_BT = None if student_mask_BT is None else keep_BT
        # Upcast before subtracting: a bf16 difference of two log-probs keeps only 8 bits.
        ell_BT = logp_student_BT.detach().to(dtype) - logp_teacher_BT.detach().to(dtype)
        ell_BT = torch.where(keep_BT, ell_BT, 0.0)
        clamped_BT = torch.zeros_like(keep_BT)
        if ratio_clip is not None:
            clamped_BT = ell_BT.abs() > ratio_clip
            ell_BT = ell_BT.clamp(-ratio_clip, ratio_clip)

        cost_BT = torch.where(keep_BT, div.cost(ell_BT), 0.0)
        if estimator == "opd_plus":
            immediate_BT = div.grad_cost(ell_BT)
            if center_cost:
                immediate_BT = immediate_BT - div.grad_cost(ell_BT.new_zeros(()))
        else:
            immediate_BT = cost_BT
        adv_BT = -(immediate_BT + discounted_future_sum(cost_BT, discount, steps_BT=steps_BT))
        adv_BT = torch.where(keep_BT, adv_BT, 0.0)
    return adv_BT, ell_BT, cost_BT, clamped_BT, keep_BT
