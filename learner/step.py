"""One learner step's loss on a (shard of a) `TrainBatch`, in pure torch.

The learner recomputes logp_learner = log π_θ(y_t|s_t) with a forward pass of the causal LM
(`rollout.alignment.token_logprobs`, the one home of the off-by-one), then

    ell_t = sg(logp_learner_t) − logp_teacher_t            (docs/math.md §1)
    A_t   = −( c_t + Σ_{k>t} γ^{k−t} g(r_k) )              (`learner.advantages`, §3)
    loss  = Σ_t −A_t · w_t · logp_learner_t / N            (`learner.loss`, §3 and §7)

with w_t = min(exp(logp_learner_t − logp_sampler_t), is_cap). N is the GLOBAL normaliser of the
whole step's batch (`global_normaliser`), so the losses and gradients of data-parallel shards
sum to those of the full batch. Imports no deepspeed, ray or vllm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from learner.advantages import token_advantages_with_stats
from learner.batch import TrainBatch
from learner.dense import dense_batch_loss, topk_token_logprobs
from learner.logprobs import sampled_logprobs
from learner.loss import surrogate_loss
from learner.settings import LossSettings
from rollout.alignment import token_logprobs
from services.errors import UserError


class NonFiniteError(UserError, FloatingPointError):
    """A learner step's loss or gradient norm is NaN or infinite. Raised before the optimizer
    step when the loss is (``compute_loss``), else as soon as the step's metrics are back
    (``check_finite``): in both cases before anything is published or checkpointed. Final:
    resuming would replay the same batch, so the message carries no resume command."""


# The values a NonFiniteError quotes from the last finite step.
_QUOTED = ("learner/loss", "learner/grad_norm", "distill/divergence", "learner/lr")
_ADVICE = (
    "Nothing of this step was published or checkpointed. Resuming would replay the same batch "
    "and fail the same way; check the prompts and the teacher's log-probs, or start a new run "
    "with a lower learner.lr or a learner.grad_clip"
)


@dataclass(frozen=True)
class StepStats:
    """Diagnostics of one shard's loss; per-token means are over its response tokens (the
    student's only in an episode).

    loss:              this shard's share of the global loss (shares sum to the batch loss).
    divergence:        mean g(r_t) = cost(ell_t); unbiased for the per-token D_f(student‖teacher).
    ell_mean:          mean ell_t (after clamping); estimates KL(student‖teacher) per token.
    clamped_frac:      fraction of tokens with |ell_t| > ratio_clip.
    adv_abs_max:       max |A_t|.
    is_truncated_frac: fraction of tokens whose importance ratio exceeded is_cap.
    is_weight_mean:    mean truncated importance weight w_t.
    mismatch:          mean |logp_learner − logp_sampler| (learner vs sampler numerics).
    num_tokens:        response tokens in the shard (the student's in an episode: the weight of
                       its per-token means in `merge_metrics`); num_sequences: rows in the shard.
    """

    loss: float
    divergence: float
    ell_mean: float
    clamped_frac: float
    adv_abs_max: float
    is_truncated_frac: float
    is_weight_mean: float
    mismatch: float
    num_tokens: int
    num_sequences: int

    def metrics(self) -> dict[str, float]:
        """Flat metric names as the trainer logs them."""
        return {
            "learner/loss": self.loss,
            "learner/tokens": float(self.num_tokens),
            "learner/sequences": float(self.num_sequences),
            "distill/divergence": self.divergence,
            "distill/ell_mean": self.ell_mean,
            "distill/clamped_frac": self.clamped_frac,
            "distill/adv_abs_max": self.adv_abs_max,
            "distill/is_truncated_frac": self.is_truncated_frac,
            "distill/is_weight_mean": self.is_weight_mean,
            "distill/mismatch": self.mismatch,
        }


# How `merge_metrics` combines a metric across data-parallel shards; anything not listed is a
# per-token mean of a distill statistic (token-weighted) or a global value equal on every rank.
_SUMMED = ("learner/loss", "learner/tokens", "learner/sequences", "learner/cells")
_MAXED = ("distill/adv_abs_max", "learner/step_time_s", "learner/micro_batches")
_CELL_WEIGHTED = ("learner/padding_frac",)


def merge_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Combine the shards' `metrics()` into the full batch's.

    Losses and counts add (the losses are shares of one global loss), per-token means are
    weighted by each shard's token count, the padding fraction by its cell count, maxima take
    the max; other values (grad norm, lr) are global and taken from rank 0. Also merges one
    shard's micro-batches.
    """
    tokens = [m["learner/tokens"] for m in per_rank]
    cells = [m.get("learner/cells", 0.0) for m in per_rank]
    merged = {}
    for key, first in per_rank[0].items():
        values = [m[key] for m in per_rank]
        if key in _SUMMED:
            merged[key] = sum(values)
        elif key in _MAXED:
            merged[key] = max(values)
        elif key in _CELL_WEIGHTED:
            merged[key] = _weighted_mean(values, cells)
        elif key.startswith("distill/"):
            merged[key] = _weighted_mean(values, tokens)
        else:
            merged[key] = first
    return merged


def _weighted_mean(values: list[float], weights: list[float]) -> float:
    total = sum(weights)
    if total == 0:
        return 0.0
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


def global_normaliser(batch: TrainBatch, aggregation: str) -> float:
    """N for `surrogate_loss` over the FULL step batch (before splitting across ranks).

    token_mean: number of response tokens; seq_mean: number of rows with a response token.
    In an episode only the student's tokens count (docs/math.md §10). At least 1, so an
    all-empty batch gives a zero loss rather than NaN.
    """
    mask_BT = batch.student_response_mask_BT
    if aggregation == "token_mean":
        n = mask_BT.sum().item()
    elif aggregation == "seq_mean":
        n = (mask_BT.sum(-1) > 0).sum().item()
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}")
    return float(max(n, 1))


def learner_logprobs(
    model: torch.nn.Module,
    batch: TrainBatch,
    *,
    temperature: float,
    chunk_size: int,
    vocab_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """logp_learner_BT [B, T] = log π_θ(x_i | x_<i) at temperature τ on the response columns,
    and the [B, T, K] log-probs of the teacher's top-K ids when the batch has them (else None).

    chunk_size > 0: `learner.logprobs.sampled_logprobs` (response positions only, chunked,
    zero elsewhere). 0: the naive path, full [B, T, V] logits through `token_logprobs`.
    vocab_size: the tokenizer's length; both paths softmax over the first vocab_size logits
    (the output layer's further rows are padding, docs/math.md). None: every logit.
    """
    if chunk_size > 0:
        out = sampled_logprobs(
            model,
            batch.input_ids_BT,
            batch.attention_mask_BT,
            batch.response_mask_BT,
            temperature=temperature,
            chunk_size=chunk_size,
            extra_ids_BTK=batch.teacher_topk_ids_BTK,
            vocab_size=vocab_size,
        )
        return out if batch.topk else (out, None)
    logits_BTV = model(
        input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT, use_cache=False
    ).logits
    if vocab_size is not None and vocab_size < logits_BTV.shape[-1]:
        logits_BTV = logits_BTV[..., :vocab_size]  # drop the padding rows' logits
    if temperature != 1.0:
        logits_BTV = logits_BTV.float() / temperature
    logp_BT = token_logprobs(logits_BTV, batch.input_ids_BT)
    if not batch.topk:
        return logp_BT, None
    return logp_BT, topk_token_logprobs(logits_BTV, batch.teacher_topk_ids_BTK)


def compute_loss(
    model: torch.nn.Module,
    batch: TrainBatch,
    *,
    settings: LossSettings,
    normaliser: float,
    vocab_size: int | None = None,
    teacher_head=None,
) -> tuple[Tensor, StepStats]:
    """The OPD/OPD+ surrogate loss of `batch` under `model` (module docstring) and its stats.

    model: a Hugging Face causal LM (or a DeepSpeed engine wrapping one).
    batch: tensors already on the model's device; with the teacher's top-K it takes the dense
        path (`learner.dense`).
    settings: the run's `LossSettings` (divergence, estimator, discount, clips, aggregation,
        cost centring, the sampling temperature, the log-prob chunk size).
    normaliser: `global_normaliser` of the whole step batch, not of this shard.
    vocab_size: the student tokenizer's length (`learner_logprobs`); None: every output row.
    teacher_head: the teacher's output layer (`learner.teacher_head.TeacherHead`), needed when
        `settings.teacher_head` is set (distill.teacher_topk = "full"): the batch's
        teacher_hidden_BTH through it gives the exact per-position D_f
        (`learner.teacher_head.full_batch_loss`).
    Returns the scalar loss (with gradient) and `StepStats`.
    """
    s = settings
    divergence = s.get_divergence()
    ratio_clip = s.ratio_clip or None
    if s.teacher_head is not None:  # OPD+ over the full vocabulary: learner/teacher_head.py
        return _full_vocab_loss(model, batch, s, teacher_head, normaliser=normaliser)
    logp_learner_BT, logp_topk_BTK = learner_logprobs(
        model, batch, temperature=s.temperature, chunk_size=s.logprob_chunk, vocab_size=vocab_size
    )
    if batch.topk:  # OPD+ over the teacher's top-K (distill.teacher_topk > 0): learner/dense.py
        loss, dense = dense_batch_loss(
            logp_learner_BT,
            logp_topk_BTK,
            batch,
            divergence=divergence,
            discount=s.discount,
            ratio_clip=ratio_clip,
            is_cap=s.is_cap,
            aggregation=s.aggregation,
            normaliser=normaliser,
        )
        return _dense_result(loss, dense, batch, logp_learner_BT)
    mask_BT = batch.response_mask_BT
    adv_BT, adv_stats = token_advantages_with_stats(
        logp_learner_BT.detach(),
        batch.logp_teacher_BT,
        mask_BT,
        divergence=divergence,
        estimator=s.estimator,
        discount=s.discount,
        ratio_clip=ratio_clip,
        center_cost=s.center_cost,
        student_mask_BT=batch.student_mask_BT,
    )
    loss, loss_stats = surrogate_loss(
        logp_learner_BT,
        adv_BT,
        batch.logp_sampler_BT,
        mask_BT,
        is_cap=s.is_cap,
        aggregation=s.aggregation,
        normaliser=normaliser,
        student_mask_BT=batch.student_mask_BT,
    )
    stats = StepStats(
        loss=loss.item(),
        divergence=adv_stats.divergence_estimate,
        ell_mean=adv_stats.mean_ell,
        clamped_frac=adv_stats.clamped_frac,
        adv_abs_max=adv_stats.max_abs_advantage,
        is_truncated_frac=loss_stats.is_truncated_frac,
        is_weight_mean=loss_stats.is_weight_mean,
        mismatch=loss_stats.mismatch,
        num_tokens=batch.num_student_tokens,
        num_sequences=batch.num_sequences,
    )
    _check_loss(stats.loss, batch, logp_learner_BT)
    return loss, stats


def _full_vocab_loss(
    model: torch.nn.Module, batch: TrainBatch, s: LossSettings, head, *, normaliser: float
) -> tuple[Tensor, StepStats]:
    """`compute_loss` for distill.teacher_topk = "full" (`learner.teacher_head.full_batch_loss`);
    its `DenseStats` as the top-K path's."""
    from learner.teacher_head import full_batch_loss

    if head is None or batch.teacher_hidden_BTH is None:
        raise ValueError(
            'distill.teacher_topk = "full" needs the teacher\'s output layer and a batch with '
            "teacher_hidden_BTH (scored by a hidden-state teacher scorer)"
        )
    loss, logp_learner_BT, dense = full_batch_loss(
        model,
        batch,
        batch.teacher_hidden_BTH,
        head,
        divergence=s.get_divergence(),
        discount=s.discount,
        ratio_clip=s.ratio_clip or None,
        is_cap=s.is_cap,
        aggregation=s.aggregation,
        normaliser=normaliser,
        temperature=s.temperature,
        teacher_temperature=s.teacher_head.teacher_temperature,
        chunk_size=s.logprob_chunk,
    )
    return _dense_result(loss, dense, batch, logp_learner_BT)


def _dense_result(loss: Tensor, dense, batch: TrainBatch, logp_learner_BT: Tensor):
    """(loss, StepStats) of a dense path (top-K or full vocabulary), its loss checked finite."""
    stats = StepStats(
        loss=loss.item(),
        **dense.step_fields(),
        num_tokens=batch.num_student_tokens,
        num_sequences=batch.num_sequences,
    )
    _check_loss(stats.loss, batch, logp_learner_BT)
    return loss, stats


def _check_loss(loss: float, batch: TrainBatch, logp_learner_BT: Tensor) -> None:
    """Raise NonFiniteError, before any backward or optimizer step, when ``loss`` is NaN/Inf;
    the message says which inputs (on response tokens) are not finite."""
    if math.isfinite(loss):
        return
    mask = batch.student_response_mask_BT.bool()
    inputs = {
        "teacher log-probs": batch.logp_teacher_BT,
        "sampler log-probs": batch.logp_sampler_BT,
        "learner log-probs": logp_learner_BT.detach(),
    }
    found = []
    for name, values in inputs.items():
        if values is None:
            continue
        picked = values[mask].float()
        nan, inf = int(picked.isnan().sum()), int(picked.isposinf().sum())
        if nan or inf:
            found.append(f"{name}: {nan} NaN, {inf} +Inf")
    where = "; ".join(found) if found else "every input is finite: the loss itself overflowed"
    raise NonFiniteError(
        f"the learner's loss is {loss} on a shard of {batch.num_sequences} samples "
        f"({batch.num_response_tokens} response tokens) — {where}"
    )


def check_finite(
    metrics: dict[str, float], *, step: int | None, last: tuple[int, dict] | None
) -> None:
    """Raise NonFiniteError when the step's loss or gradient norm is NaN/Inf, naming ``step``
    and the ``last`` finite step's values ((step, metrics) or None)."""
    bad = [
        f"{key} = {metrics[key]}"
        for key in ("learner/loss", "learner/grad_norm")
        if key in metrics and not math.isfinite(metrics[key])
    ]
    if bad:
        raise NonFiniteError(diverged_message(step, ", ".join(bad), last))


def diverged_message(step: int | None, what: str, last: tuple[int, dict] | None) -> str:
    """The message of a NonFiniteError: the step, what was not finite, the last finite values."""
    at = f"learner step {step}" if step is not None else "a learner step"
    if last is None:
        before = "no earlier step of this process finished"
    else:
        values = ", ".join(
            f"{k.split('/')[-1]} = {last[1][k]:.6g}" for k in _QUOTED if k in last[1]
        )
        before = f"the last finite step was {last[0]}: {values}"
    return f"{at} stopped: {what}; {before}. {_ADVICE}."
