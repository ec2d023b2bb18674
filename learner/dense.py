"""Dense OPD+ over the teacher's top-K tokens ("OPD+ top-K"; docs/math.md §8).

At each visited state s_t the teacher reports its top-K tokens S_t (a function of the state
only) and their log-probs. With one tail bucket holding each side's remaining mass,

    P~_t = (π_θ(S_t|s_t), 1 − π_θ(S_t|s_t)),   Q~_t = (π_T(S_t|s_t), 1 − π_T(S_t|s_t)),
    D~_t(θ) = Σ_{j ∈ S_t ∪ tail} P~_j · g(log P~_j − log Q~_j)     (= Σ_j Q~_j f(P~_j/Q~_j)),

with g = f(r)/r the registry's `Divergence.cost`. D~_t = D_f(π_θ(·|s_t) ‖ π_T(·|s_t)) when K = V
and a lower bound otherwise (data processing). The objective J~(θ) = E_{y~π_θ}[Σ_t D~_t(θ)] has
the exact gradient

    ∇J~ = E[ Σ_t ∇_θ D~_t(θ)  +  Σ_t ∇log π_θ(y_t|s_t) · Σ_{k>t} γ^{k−t} sg(D~_k) ]

at γ = 1; at γ = 0 it is the gradient with the state distribution frozen. The first (direct)
term is differentiated through the student's log-probs on S_t and the tail: nothing is sampled
at position t. The second (state-distribution) term is OPD+'s future cost with each sampled
g(r_k) replaced by its conditional expectation D~_k, i.e. the advantage

    A_t = −Σ_{k>t} γ^{k−t} sg(D~_k)

in the ordinary surrogate −A_t · w_t · log π_θ(y_t|s_t) (`learner.loss.surrogate_loss`).

Stale samples (docs/math.md §7). y was sampled by π_old, not π_θ. The truncated weight
w_t = min(π_θ(y_t|s_t)/π_old(y_t|s_t), is_cap) corrects the choice of y_t at s_t, so it multiplies
the state-distribution term exactly as on the sampled path. The direct term makes no choice at
s_t: D~_t depends on the state only, so w_t is NOT applied to it (E_{y_t~π_old}[w_t] = 1 would
leave its expectation unchanged but add variance). Neither term corrects the distribution of the
state s_t itself (the prefix ratio Π_{k<t} π_θ/π_old), nor the states s_k, k > t, inside A_t: the
same per-token approximation as the sampled path, exact when the sampler is the current policy.

Numerics: log P~ and log Q~ come from log-probs (logsumexp over S_t, log1p(−exp(·)) for the tail,
tail mass clamped to at least `tail_min`), never from a full-vocabulary softmax; ell is clamped to
±ratio_clip before g, like the sampled path. A clamped entry keeps the gradient through P~_j but
not through ell_j, so for exponential-tailed costs (forward KL, ...) the pull on tokens the
student has almost no mass on is damped: report and watch `clamped_frac`. The student's top-K
log-probs are gathered from the logits chunk by chunk (`topk_token_logprobs`) without a
[B, T, V] float32 tensor. Both sides are softmaxes over the tokenizer's ids only: an output
layer's padding rows are sliced off before any log-softmax (the teacher's in its engine, the
student's in `learner.step.learner_logprobs`; docs/math.md §6), so no top-K id names a padding
row and P~, Q~ share one support. Pure torch: no config, transformers, ray or vllm.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from learner.advantages import compute_dtype, discounted_future_sum, keep_mask
from learner.divergences import Divergence, get_divergence
from learner.loss import AGGREGATIONS, surrogate_loss

if TYPE_CHECKING:
    from learner.batch import TrainBatch

_LOG2 = math.log(2.0)


@dataclass(frozen=True)
class DenseStats:
    """Batch diagnostics over masked (response) positions.

    divergence:        mean D~_t, the per-token restricted divergence (a lower bound on D_f).
    clamped_frac:      fraction of support entries (K + tail per position) with |ell| > ratio_clip.
    adv_abs_max:       max |A_t| of the state-distribution term.
    teacher_tail_mean: mean teacher mass outside its top-K (how much of q the top-K misses).
    student_tail_mean: mean student mass outside the teacher's top-K.
    is_truncated_frac, is_weight_mean, mismatch: as `learner.loss.LossStats`.
    """

    divergence: float
    clamped_frac: float
    adv_abs_max: float
    teacher_tail_mean: float
    student_tail_mean: float
    is_truncated_frac: float
    is_weight_mean: float
    mismatch: float
    ell_mean: float = 0.0

    def step_fields(self) -> dict[str, float]:
        """The fields `learner.step.StepStats` shares with these stats, by its names."""
        names = ("divergence", "ell_mean", "clamped_frac", "adv_abs_max")
        names += ("is_truncated_frac", "is_weight_mean", "mismatch")
        values = asdict(self)
        return {name: values[name] for name in names}


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − exp(x)) for x < 0, accurate at both ends (expm1 near 0, log1p far from 0).

    Each branch only sees inputs in its own safe range, so the unused branch of the where()
    cannot put inf/NaN into the backward pass.
    """
    near = torch.log(-torch.expm1(x.clamp(min=-_LOG2)))
    far = torch.log1p(-torch.exp(x.clamp(max=-_LOG2)))
    return torch.where(x > -_LOG2, near, far)


def restricted_log_dists(
    logp_student_NK: Tensor, logp_teacher_NK: Tensor, *, tail_min: float | None = None
) -> tuple[Tensor, Tensor]:
    """(log P~ [N, K+1], log Q~ [N, K+1]): the K support entries then the tail bucket.

    logp_*_NK: [..., K] log-probs of the teacher's top-K tokens under each model (any leading
        shape). The tail is log(1 − Σ_S p) = log1mexp(logsumexp(logp)), with the covered mass
        clamped to at most 1 − tail_min (float round-off can make a top-K that covers the whole
        vocabulary sum past 1). When a side's tail is clamped it carries no gradient; when both
        are, ell_tail = 0 and g(0) = f(1) = 0, so the bucket adds nothing (the K = V case).
    tail_min: smallest tail mass; default 16 · machine epsilon of the dtype.
    """
    dtype = logp_student_NK.dtype
    if tail_min is None:
        tail_min = 16 * torch.finfo(dtype).eps
    cap = math.log1p(-tail_min)

    def with_tail(logp_NK: Tensor) -> Tensor:
        covered_N = torch.logsumexp(logp_NK, dim=-1).clamp(max=cap)
        return torch.cat([logp_NK, log1mexp(covered_N).unsqueeze(-1)], dim=-1)

    return with_tail(logp_student_NK), with_tail(logp_teacher_NK)


def restricted_divergence(
    logp_student_NK: Tensor,
    logp_teacher_NK: Tensor,
    *,
    divergence: Divergence | str,
    ratio_clip: float | None = 10.0,
    tail_min: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(D~_N [...], clamped_NJ [..., K+1] bool): the per-state restricted divergence.

    D~ = Σ_j P~_j · g(clamp(log P~_j − log Q~_j, ±ratio_clip)) over the K support entries and the
    tail (module docstring). Differentiable in logp_student_NK (the direct term); the teacher
    side is used detached. Computed in the inputs' promoted dtype, at least float32.
    """
    div = get_divergence(divergence)
    if logp_student_NK.shape != logp_teacher_NK.shape:
        raise ValueError(
            f"shape mismatch: student {tuple(logp_student_NK.shape)}, "
            f"teacher {tuple(logp_teacher_NK.shape)}"
        )
    if logp_student_NK.shape[-1] < 1:
        raise ValueError("the teacher's support needs at least one token (K >= 1)")
    if ratio_clip is not None and not ratio_clip > 0:
        raise ValueError(f"ratio_clip must be positive or None, got {ratio_clip}")
    dtype = compute_dtype(logp_student_NK, logp_teacher_NK)
    logp_p_NJ, logp_q_NJ = restricted_log_dists(
        logp_student_NK.to(dtype), logp_teacher_NK.detach().to(dtype), tail_min=tail_min
    )
    ell_NJ = logp_p_NJ - logp_q_NJ
    clamped_NJ = torch.zeros_like(ell_NJ, dtype=torch.bool)
    if ratio_clip is not None:
        clamped_NJ = ell_NJ.detach().abs() > ratio_clip
        ell_NJ = ell_NJ.clamp(-ratio_clip, ratio_clip)
    d_N = (logp_p_NJ.exp() * div.cost(ell_NJ)).sum(-1)
    return d_N, clamped_NJ


def dense_surrogate_loss(
    logp_student_BTK: Tensor,
    logp_teacher_BTK: Tensor,
    logp_learner_BT: Tensor,
    logp_sampler_BT: Tensor,
    mask_BT: Tensor,
    *,
    divergence: Divergence | str,
    discount: float = 0.0,
    ratio_clip: float | None = 10.0,
    is_cap: float | None = 2.0,
    aggregation: str = "token_mean",
    normaliser: float | Tensor | None = None,
    tail_min: float | None = None,
    logp_teacher_BT: Tensor | None = None,
    student_mask_BT: Tensor | None = None,
) -> tuple[Tensor, DenseStats]:
    """Scalar OPD+ top-K surrogate loss and its `DenseStats`.

    Per response position, loss_t = D~_t(θ) − A_t · w_t · log π_θ(y_t|s_t) with
    A_t = −Σ_{k>t} γ^{k−t} sg(D~_k) (module docstring), aggregated exactly as
    `learner.loss.surrogate_loss` (token_mean / seq_mean, `normaliser` = the global N).

    logp_student_BTK: [B, T, K] log π_θ(v|s_t) at the teacher's top-K ids, with gradient.
    logp_teacher_BTK: [B, T, K] the teacher's top-K log-probs (detached).
    logp_learner_BT:  [B, T] log π_θ(y_t|s_t) of the sampled token, with gradient.
    logp_sampler_BT:  [B, T] the sampler's log-prob of y_t (for w_t).
    mask_BT:          [B, T] nonzero on response positions; the rest (padding, prompt) adds
                      nothing and may hold garbage.
    discount: γ ∈ [0, 1]; ratio_clip, is_cap: None disables.
    logp_teacher_BT: optional [B, T] teacher log-prob of y_t, only for the `ell_mean` stat.
    student_mask_BT: optional [B, T], 0 at an episode's environment tokens: no D~, no score
        term, no step of γ there (docs/math.md §10). None: every masked position counts.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    if logp_student_BTK.shape != logp_teacher_BTK.shape or logp_student_BTK.dim() != 3:
        raise ValueError(
            f"top-K log-probs must share one [B, T, K] shape, got student "
            f"{tuple(logp_student_BTK.shape)}, teacher {tuple(logp_teacher_BTK.shape)}"
        )
    if logp_student_BTK.shape[:2] != mask_BT.shape:
        raise ValueError(
            f"top-K log-probs {tuple(logp_student_BTK.shape)} do not match the mask "
            f"{tuple(mask_BT.shape)}"
        )

    dtype = compute_dtype(logp_student_BTK, logp_teacher_BTK, logp_learner_BT)
    keep_BT = keep_mask(mask_BT, student_mask_BT)
    # An episode's environment tokens: no D~, no score term, no step of γ (docs/math.md §10).
    steps_BT = None if student_mask_BT is None else keep_BT
    mask_BT = mask_BT if student_mask_BT is None else keep_BT
    keep_BT1 = keep_BT.unsqueeze(-1)
    K = logp_student_BTK.shape[-1]
    # Off the mask, swap in a harmless uniform distribution before any logsumexp / exp: padding
    # may hold zeros (covered mass K > 1) or NaN, and where() after the fact would still send
    # NaN through the backward pass.
    safe = -math.log(K + 1)
    logp_s_BTK = torch.where(keep_BT1, logp_student_BTK.to(dtype), safe)
    logp_t_BTK = torch.where(keep_BT1, logp_teacher_BTK.detach().to(dtype), safe)
    d_BT, clamped_BTJ = restricted_divergence(
        logp_s_BTK, logp_t_BTK, divergence=divergence, ratio_clip=ratio_clip, tail_min=tail_min
    )
    d_BT = torch.where(keep_BT, d_BT, 0.0)

    loss, adv_BT, loss_stats = _two_terms(
        d_BT,
        keep_BT,
        logp_learner_BT,
        logp_sampler_BT,
        mask_BT,
        steps_BT=steps_BT,
        discount=discount,
        is_cap=is_cap,
        aggregation=aggregation,
        normaliser=normaliser,
    )

    with torch.no_grad():
        n = keep_BT.sum().clamp(min=1).to(dtype)
        logp_p_BTJ, logp_q_BTJ = restricted_log_dists(
            logp_s_BTK.detach(), logp_t_BTK, tail_min=tail_min
        )
        terms = [
            d_BT.detach().sum() / n,
            (clamped_BTJ & keep_BT1).sum().to(dtype) / (n * (K + 1)),
            adv_BT.abs().amax() if adv_BT.numel() else adv_BT.new_zeros(()),
            torch.where(keep_BT, logp_q_BTJ[..., -1].exp(), 0.0).sum() / n,
            torch.where(keep_BT, logp_p_BTJ[..., -1].exp(), 0.0).sum() / n,
        ]
        # The sampled token's ell, as on the sampled path (estimates KL(student‖teacher)).
        if logp_teacher_BT is not None:
            ell_BT = logp_learner_BT.detach().to(dtype) - logp_teacher_BT.to(dtype)
            if ratio_clip is not None:
                ell_BT = ell_BT.clamp(-ratio_clip, ratio_clip)
            terms.append(torch.where(keep_BT, ell_BT, 0.0).sum() / n)
        values = torch.stack(terms).tolist()
    stats = DenseStats(
        *values[:5],
        ell_mean=values[5] if len(values) > 5 else 0.0,
        is_truncated_frac=loss_stats.is_truncated_frac,
        is_weight_mean=loss_stats.is_weight_mean,
        mismatch=loss_stats.mismatch,
    )
    return loss, stats


def dense_batch_loss(
    logp_learner_BT: Tensor,
    logp_topk_BTK: Tensor,
    batch: TrainBatch,
    *,
    divergence: Divergence | str,
    discount: float,
    ratio_clip: float | None,
    is_cap: float | None,
    aggregation: str,
    normaliser: float,
) -> tuple[Tensor, DenseStats]:
    """`dense_surrogate_loss` of a `learner.batch.TrainBatch` that carries the teacher's top-K.

    logp_learner_BT: [B, T] the learner's log-prob of each sampled token, with gradient.
    logp_topk_BTK:   [B, T, K] the learner's log-probs at batch.teacher_topk_ids_BTK (same
        alignment: column i holds log π_θ(· | x_<i)), with gradient; e.g. `topk_token_logprobs`
        on the logits, or the extra ids of a chunked log-prob pass.
    The rest as `dense_surrogate_loss`; ratio_clip None (or 0) disables clamping.
    """
    if batch.teacher_topk_logp_BTK is None:
        raise ValueError("the batch carries no teacher top-K (distill.teacher_topk = 0)")
    return dense_surrogate_loss(
        logp_topk_BTK,
        batch.teacher_topk_logp_BTK,
        logp_learner_BT,
        batch.logp_sampler_BT,
        batch.response_mask_BT,
        divergence=divergence,
        discount=discount,
        ratio_clip=ratio_clip or None,
        is_cap=is_cap,
        aggregation=aggregation,
        normaliser=normaliser,
        logp_teacher_BT=batch.logp_teacher_BT,
        student_mask_BT=batch.student_mask_BT,
    )


def _two_terms(
    d_BT: Tensor,
    keep_BT: Tensor,
    logp_learner_BT: Tensor,
    logp_sampler_BT: Tensor,
    mask_BT: Tensor,
    *,
    steps_BT: Tensor | None = None,
    discount: float,
    is_cap: float | None,
    aggregation: str,
    normaliser: float | Tensor | None,
) -> tuple[Tensor, Tensor, dict]:
    """The dense OPD+ loss from a per-position divergence ``d_BT`` (zero off ``keep_BT``):
    the direct term D_t plus the state-distribution term, whose future cost is OPD+'s with
    g(r_k) replaced by sg(D_k). One home for the top-K (D~) and full-vocabulary (D) paths.
    Returns (loss, adv_BT, surrogate_loss's stats)."""
    future_BT = discounted_future_sum(d_BT.detach(), discount, steps_BT=steps_BT)
    adv_BT = torch.where(keep_BT, -future_BT, 0.0)
    state_loss, loss_stats = surrogate_loss(
        logp_learner_BT,
        adv_BT,
        logp_sampler_BT,
        mask_BT,
        is_cap=is_cap,
        aggregation=aggregation,
        normaliser=normaliser,
    )
    # Direct term: no importance weight (it depends on s_t only; see the module docstring).
    return _aggregate(d_BT, keep_BT, aggregation, normaliser) + state_loss, adv_BT, loss_stats


def _aggregate(
    loss_BT: Tensor, keep_BT: Tensor, aggregation: str, normaliser: float | Tensor | None
) -> Tensor:
    """The aggregation of `learner.loss.surrogate_loss`, for a per-position loss zero off mask."""
    if aggregation == "token_mean":
        denom = keep_BT.sum().clamp(min=1) if normaliser is None else normaliser
        return loss_BT.sum() / denom
    n_B = keep_BT.sum(-1)
    denom = (n_B > 0).sum().clamp(min=1) if normaliser is None else normaliser
    return (loss_BT.sum(-1) / n_B.clamp(min=1)).sum() / denom


class _ShiftedGatherLogSoftmax(torch.autograd.Function):
    """out[b, i, k] = log softmax(logits[b, i])[ids[b, i, k]] for i < T − 1, chunked over positions.

    Forward: per (row, chunk of positions), upcast to float32, logsumexp, gather. Only the
    [B, T−1] logsumexp is kept for backward, which recomputes softmax chunk by chunk:
    ∂/∂logits = scatter(grad) − (Σ_k grad_k) · softmax(logits), written in the logits' dtype.
    No [B, T, V] float32 tensor exists at any time, and the logits are never copied.
    """

    @staticmethod
    def forward(ctx, logits_BTV: Tensor, ids_BTK: Tensor, chunk: int) -> Tensor:
        B, T, _ = logits_BTV.shape
        dev = logits_BTV.device
        out_BTK = torch.empty((B, T - 1, ids_BTK.shape[-1]), dtype=torch.float32, device=dev)
        lse_BT = torch.empty((B, T - 1), dtype=torch.float32, device=dev)
        for b in range(B):
            for lo in range(0, T - 1, chunk):
                hi = min(lo + chunk, T - 1)
                logits_cV = logits_BTV[b, lo:hi].float()
                lse_BT[b, lo:hi] = torch.logsumexp(logits_cV, dim=-1)
                picked_cK = logits_cV.gather(-1, ids_BTK[b, lo:hi])
                out_BTK[b, lo:hi] = picked_cK - lse_BT[b, lo:hi, None]
        ctx.save_for_backward(logits_BTV, ids_BTK, lse_BT)
        ctx.chunk = chunk
        return out_BTK

    @staticmethod
    def backward(ctx, grad_BTK: Tensor):
        logits_BTV, ids_BTK, lse_BT = ctx.saved_tensors
        B, T, _ = logits_BTV.shape
        grad_BTV = torch.zeros_like(logits_BTV)
        for b in range(B):
            for lo in range(0, T - 1, ctx.chunk):
                hi = min(lo + ctx.chunk, T - 1)
                g_cK = grad_BTK[b, lo:hi].float()
                p_cV = (logits_BTV[b, lo:hi].float() - lse_BT[b, lo:hi, None]).exp()
                g_cV = p_cV.mul_(-g_cK.sum(-1, keepdim=True))
                g_cV.scatter_add_(-1, ids_BTK[b, lo:hi], g_cK)
                grad_BTV[b, lo:hi] = g_cV.to(grad_BTV.dtype)
        return grad_BTV, None, None


def topk_token_logprobs(logits_BTV: Tensor, ids_BTK: Tensor, *, chunk: int = 256) -> Tensor:
    """logp_BTK[b, i, k] = log softmax(logits[b, i−1])[ids[b, i, k]] for i ≥ 1; column 0 is 0.

    The `rollout.alignment` convention: column i holds log π(· | x_<i), predicted by the logits
    at i − 1. ids_BTK are the teacher's top-K ids per column (the sampled token can ride along
    as one more column of ids); every id must be < V, padding columns may hold any valid id.
    Float32 result, differentiable in the logits; memory beyond the logits (and their gradient)
    is O(chunk · V) float32 plus the [B, T, K] output.
    """
    if logits_BTV.dim() != 3 or ids_BTK.dim() != 3 or logits_BTV.shape[:2] != ids_BTK.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits_BTV.shape)} and ids {tuple(ids_BTK.shape)} must be "
            "[B, T, V] and [B, T, K]"
        )
    B, T, V = logits_BTV.shape
    K = ids_BTK.shape[-1]
    if ids_BTK.numel() and not 0 <= int(ids_BTK.min()) <= int(ids_BTK.max()) < V:
        raise ValueError(
            f"top-K ids span [{int(ids_BTK.min())}, {int(ids_BTK.max())}], outside the "
            f"student's vocabulary of {V} logits"
        )
    if T < 2:
        return torch.zeros((B, T, K), dtype=torch.float32, device=logits_BTV.device)
    # Column i + 1's ids are scored by the logits at i.
    ids_next_BTK = ids_BTK[:, 1:].long().contiguous()
    logp_BTK = _ShiftedGatherLogSoftmax.apply(logits_BTV, ids_next_BTK, chunk)
    return torch.nn.functional.pad(logp_BTK, (0, 0, 1, 0), value=0.0)


# ----------------------------------------------------------------- the full vocabulary ("full")
# With the teacher's final hidden states and its output layer, the learner has π_T(·|s_t) over
# every token: the dense loss is the exact D_f(π_θ(·|s_t) ‖ π_T(·|s_t)) (no tail bucket, not a
# lower bound) with the same two terms as above (docs/math.md §8, "The full vocabulary").


def head_log_softmax(hidden_CH: Tensor, weight_VH: Tensor, temperature: float = 1.0) -> Tensor:
    """[C, V] log softmax(h·Wᵀ / τ) for one chunk of positions, in at least float32.

    hidden_CH: [C, H] final hidden states (after the final norm); weight_VH: [V, H] the output
    layer already cut to the tokenizer's V rows (docs/math.md §6, "Padding rows"). The product
    runs in the weight's dtype (hidden states are cast to it), then upcasts.
    """
    z_CV = (hidden_CH.to(weight_VH.dtype) @ weight_VH.t()).to(
        torch.promote_types(weight_VH.dtype, torch.float32)
    )
    if temperature != 1.0:
        z_CV.div_(temperature)
    return z_CV.log_softmax(-1)


def full_divergence(
    logp_student_NV: Tensor,
    logp_teacher_NV: Tensor,
    *,
    divergence: Divergence | str,
    ratio_clip: float | None = 10.0,
) -> tuple[Tensor, Tensor]:
    """(D_N [...], clamped_NV bool): D_f(π_θ ‖ π_T) = Σ_v π_θ(v) · g(clamp(ell_v, ±ratio_clip)).

    logp_*_NV: [..., V] full-vocabulary log-probs of each side. With ratio_clip None this is the
    exact per-state f-divergence; a clamped entry keeps its gradient through π_θ(v) only (as in
    `restricted_divergence`). Differentiable in logp_student_NV; the teacher side is detached.
    The reference form (autograd through it gives ∇D_f); `full_vocab_divergence` is the chunked
    production path with the same values and the gradient written out.
    """
    div = get_divergence(divergence)
    ell_NV = logp_student_NV - logp_teacher_NV.detach()
    clamped_NV = torch.zeros_like(ell_NV, dtype=torch.bool)
    if ratio_clip is not None:
        clamped_NV = ell_NV.detach().abs() > ratio_clip
        ell_NV = ell_NV.clamp(-ratio_clip, ratio_clip)
    return (logp_student_NV.exp() * div.cost(ell_NV)).sum(-1), clamped_NV


def _student_log_softmax(student_CX: Tensor, weight_VH: Tensor | None, temperature: float):
    """The student's [C, V] log-probs from hidden states (weight given) or from logits."""
    if weight_VH is not None:
        return head_log_softmax(student_CX, weight_VH, temperature)
    z_CV = student_CX.to(torch.promote_types(student_CX.dtype, torch.float32))
    return (z_CV / temperature if temperature != 1.0 else z_CV).log_softmax(-1)


class _ChunkedFullDivergence(torch.autograd.Function):
    """d_N = D_f(softmax(z_s/τ) ‖ softmax(W_T h_T/τ_T)) per position, chunk by chunk, and
    logp_N = log softmax(z_s/τ)[y_n] of the sampled tokens (when targets are given).

    z_s = student hidden · W_sᵀ (or the student's logits when W_s is None). Nothing [N, V] is
    kept: backward recomputes each chunk. With p = π_θ, ell = log p − log q and a_v = ∂D/∂log p_v
    = p_v · f'(r_v) (= p_v · g(ell_v) where ell_v is clamped: no gradient through the clamped
    ell), the log-softmax gives ∂D/∂z_v = (a_v − p_v · Σ_u a_u) / τ, and ∂logp_y/∂z_v =
    (1[v = y] − p_v) / τ. One function for both, so ∂/∂W_s is accumulated once, in at least
    float32. The teacher's hidden states and weight get no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        student_NX,
        weight_VH,
        t_hidden_NH,
        t_weight_VH,
        targets_N,
        div,
        tau,
        tau_t,
        clip,
        chunk,
    ):
        N = student_NX.shape[0]
        dtype = torch.promote_types(
            student_NX.dtype if weight_VH is None else weight_VH.dtype, torch.float32
        )
        d_N = student_NX.new_zeros(N, dtype=dtype)
        logp_N = student_NX.new_zeros(N, dtype=dtype)
        clamped_N = student_NX.new_zeros(N, dtype=dtype)
        with torch.no_grad():
            for lo in range(0, N, chunk):
                hi = min(lo + chunk, N)
                logp_s_CV = _student_log_softmax(student_NX[lo:hi], weight_VH, tau)
                logp_t_CV = head_log_softmax(t_hidden_NH[lo:hi], t_weight_VH, tau_t)
                d_C, clamped_CV = full_divergence(
                    logp_s_CV, logp_t_CV.to(dtype), divergence=div, ratio_clip=clip
                )
                d_N[lo:hi], clamped_N[lo:hi] = d_C, clamped_CV.sum(-1)
                if targets_N is not None:
                    logp_N[lo:hi] = logp_s_CV.gather(1, targets_N[lo:hi, None])[:, 0]
                del logp_s_CV, logp_t_CV, clamped_CV
        ctx.save_for_backward(student_NX, weight_VH, t_hidden_NH, t_weight_VH, targets_N)
        ctx.settings = (div, tau, tau_t, clip, chunk)
        ctx.mark_non_differentiable(clamped_N)
        return d_N, logp_N, clamped_N

    @staticmethod
    def backward(ctx, g_N, g_logp_N, _g_clamped):
        student_NX, weight_VH, t_hidden_NH, t_weight_VH, targets_N = ctx.saved_tensors
        div, tau, tau_t, clip, chunk = ctx.settings
        need_x, need_w = ctx.needs_input_grad[:2]
        N = student_NX.shape[0]
        grad_x = torch.zeros_like(student_NX) if need_x else None
        grad_w = None
        if need_w:
            grad_w = torch.zeros(
                weight_VH.shape,
                dtype=torch.promote_types(weight_VH.dtype, torch.float32),
                device=weight_VH.device,
            )
        for lo in range(0, N, chunk):
            hi = min(lo + chunk, N)
            logp_s_CV = _student_log_softmax(student_NX[lo:hi], weight_VH, tau)
            logp_t_CV = head_log_softmax(t_hidden_NH[lo:hi], t_weight_VH, tau_t)
            ell_CV = logp_s_CV - logp_t_CV.to(logp_s_CV.dtype)
            del logp_t_CV
            p_CV = logp_s_CV.exp_()  # the log-probs are not needed any more
            if clip is None:
                a_CV = div.grad_cost(ell_CV)
            else:
                a_CV = torch.where(
                    ell_CV.abs() > clip, div.cost(ell_CV.clamp(-clip, clip)), div.grad_cost(ell_CV)
                )
            del ell_CV
            # g·∂D/∂z + g'·∂logp_y/∂z = g·a − p·(g·Σa + g') + g'·1[v = y], then / τ.
            a_CV.mul_(p_CV).mul_(g_N[lo:hi].to(a_CV.dtype)[:, None])
            total_C = a_CV.sum(-1)
            if targets_N is not None:
                g_logp_C = g_logp_N[lo:hi].to(a_CV.dtype)
                total_C = total_C + g_logp_C
            dz_CV = a_CV.sub_(p_CV * total_C[:, None])
            if targets_N is not None:
                dz_CV.scatter_add_(1, targets_N[lo:hi, None], g_logp_C[:, None])
            dz_CV.div_(tau)
            del p_CV
            if weight_VH is None:
                grad_x[lo:hi] = dz_CV.to(grad_x.dtype)
                continue
            h_CH = student_NX[lo:hi]
            if need_x:
                grad_x[lo:hi] = dz_CV.to(weight_VH.dtype) @ weight_VH
            if need_w:
                grad_w.addmm_(dz_CV.t(), h_CH.to(grad_w.dtype))
            del dz_CV
        if grad_w is not None:
            grad_w = grad_w.to(weight_VH.dtype)
        return grad_x, grad_w, None, None, None, None, None, None, None, None


def full_vocab_divergence(
    student_NX: Tensor,
    teacher_hidden_NH: Tensor,
    teacher_weight_VH: Tensor,
    *,
    divergence: Divergence | str,
    student_weight_VH: Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    ratio_clip: float | None = 10.0,
    chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """(d_N, clamped_N): the exact per-position D_f(π_θ(·|s_n) ‖ π_T(·|s_n)), chunked.

    student_NX: [N, H] the student's final hidden states when student_weight_VH ([V, H], cut to
        the tokenizer's V rows) is given, else [N, V] the student's logits; differentiable.
        π_θ = softmax(z / temperature).
    teacher_hidden_NH: [N, H_T] the teacher's final hidden states (any float dtype, e.g. the
        engine's bf16) for the same N states; teacher_weight_VH: [V, H_T] its output layer cut
        to the same V rows (`learner.teacher_head.load_teacher_head`). π_T = softmax(z_T / τ_T).
    ratio_clip: clamp of ell before g as `full_divergence` (None: exact, unclamped).
    chunk: positions per chunk; memory beyond the inputs is a few [chunk, V] float32 buffers.
    Returns d_N (float32, or float64 for float64 inputs), with gradient to student_NX and
    student_weight_VH, and clamped_N: how many of the V entries were clamped at each position.
    """
    d_N, _, clamped_N = full_vocab_terms(
        student_NX,
        teacher_hidden_NH,
        teacher_weight_VH,
        divergence=divergence,
        student_weight_VH=student_weight_VH,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        ratio_clip=ratio_clip,
        chunk=chunk,
    )
    return d_N, clamped_N


def full_vocab_terms(
    student_NX: Tensor,
    teacher_hidden_NH: Tensor,
    teacher_weight_VH: Tensor,
    *,
    divergence: Divergence | str,
    targets_N: Tensor | None = None,
    student_weight_VH: Tensor | None = None,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    ratio_clip: float | None = 10.0,
    chunk: int = 256,
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_N, logp_N, clamped_N): `full_vocab_divergence` and, in the same chunks, the student's
    log-prob of targets_N ([N] ids < V; logp_N is 0 when None), both differentiable; the
    student's output layer is read once per chunk and its gradient accumulated once.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if ratio_clip is not None and not ratio_clip > 0:
        raise ValueError(f"ratio_clip must be positive or None, got {ratio_clip}")
    V = teacher_weight_VH.shape[0]
    width = student_NX.shape[-1] if student_weight_VH is None else student_weight_VH.shape[0]
    if width != V:
        raise ValueError(
            f"the student's distribution has {width} entries and the teacher's output layer "
            f"{V} rows; cut both to the tokenizer's length (docs/math.md §6)"
        )
    if student_NX.shape[0] != teacher_hidden_NH.shape[0]:
        raise ValueError(
            f"{student_NX.shape[0]} student positions and {teacher_hidden_NH.shape[0]} teacher "
            "hidden states"
        )
    if targets_N is not None:
        targets_N = targets_N.long()
        if targets_N.numel() and not 0 <= int(targets_N.min()) <= int(targets_N.max()) < V:
            raise ValueError(f"target ids outside the vocabulary of {V}")
    return _ChunkedFullDivergence.apply(
        student_NX,
        student_weight_VH,
        teacher_hidden_NH.detach(),
        teacher_weight_VH.detach(),
        targets_N,
        get_divergence(divergence),
        float(temperature),
        float(teacher_temperature),
        ratio_clip,
        int(chunk),
    )


def full_dense_surrogate_loss(
    d_BT: Tensor,
    logp_learner_BT: Tensor,
    logp_sampler_BT: Tensor,
    mask_BT: Tensor,
    *,
    discount: float = 0.0,
    is_cap: float | None = 2.0,
    aggregation: str = "token_mean",
    normaliser: float | Tensor | None = None,
    clamped_BT: Tensor | None = None,
    vocab_size: int = 1,
    logp_teacher_BT: Tensor | None = None,
    ratio_clip: float | None = None,
    student_mask_BT: Tensor | None = None,
) -> tuple[Tensor, DenseStats]:
    """Scalar OPD+ full-vocabulary loss and its `DenseStats` (teacher/student tails are 0).

    loss_t = D_t(θ) − A_t · w_t · log π_θ(y_t|s_t), A_t = −Σ_{k>t} γ^{k−t} sg(D_k): the loss of
    `dense_surrogate_loss` with D~_t replaced by the exact D_t = D_f(π_θ(·|s_t) ‖ π_T(·|s_t)).

    d_BT: [B, T] D_t with gradient (e.g. `full_vocab_divergence` placed at response columns);
        off the mask it may hold anything finite or not. logp_learner_BT, logp_sampler_BT,
        mask_BT, discount, is_cap, aggregation, normaliser: as `dense_surrogate_loss`.
    clamped_BT: optional [B, T] clamped entries per position (of vocab_size), for clamped_frac.
    logp_teacher_BT: optional, the sampled token's teacher log-prob, only for `ell_mean`.
    student_mask_BT: optional [B, T], 0 at an episode's environment tokens, as
        `dense_surrogate_loss` (docs/math.md §10).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    if d_BT.shape != mask_BT.shape:
        raise ValueError(f"d_BT {tuple(d_BT.shape)} does not match the mask {tuple(mask_BT.shape)}")
    dtype = compute_dtype(d_BT, logp_learner_BT)
    keep_BT = keep_mask(mask_BT, student_mask_BT)
    steps_BT = None if student_mask_BT is None else keep_BT
    d_BT = torch.where(keep_BT, d_BT.to(dtype), 0.0)
    loss, adv_BT, loss_stats = _two_terms(
        d_BT,
        keep_BT,
        logp_learner_BT,
        logp_sampler_BT,
        mask_BT if student_mask_BT is None else keep_BT,
        steps_BT=steps_BT,
        discount=discount,
        is_cap=is_cap,
        aggregation=aggregation,
        normaliser=normaliser,
    )

    with torch.no_grad():
        n = keep_BT.sum().clamp(min=1).to(dtype)
        clamped = d_BT.new_zeros(()) if clamped_BT is None else clamped_BT.to(dtype)
        terms = [
            d_BT.detach().sum() / n,
            torch.where(keep_BT, clamped, 0.0).sum() / (n * vocab_size),
            adv_BT.abs().amax() if adv_BT.numel() else adv_BT.new_zeros(()),
        ]
        if logp_teacher_BT is not None:
            ell_BT = logp_learner_BT.detach().to(dtype) - logp_teacher_BT.to(dtype)
            if ratio_clip is not None:
                ell_BT = ell_BT.clamp(-ratio_clip, ratio_clip)
            terms.append(torch.where(keep_BT, ell_BT, 0.0).sum() / n)
        values = torch.stack(terms).tolist()
    stats = DenseStats(
        divergence=values[0],
        clamped_frac=values[1],
        adv_abs_max=values[2],
        teacher_tail_mean=0.0,
        student_tail_mean=0.0,
        ell_mean=values[3] if len(values) > 3 else 0.0,
        is_truncated_frac=loss_stats.is_truncated_frac,
        is_weight_mean=loss_stats.is_weight_mean,
        mismatch=loss_stats.mismatch,
    )
    return loss, stats
