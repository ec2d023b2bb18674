"""Learner settings for tests: explicit values in one place (production has no defaults in the
leaves; `services.parts.learner_settings` builds them from the config)."""

from __future__ import annotations

import dataclasses

from learner.settings import LossSettings, OptimSettings

OPTIM = OptimSettings(
    zero_stage=1,
    lr=1e-3,
    lr_schedule="constant",
    warmup_steps=0,
    total_steps=1,
    weight_decay=0.0,
    betas=(0.9, 0.99),
    grad_clip=1.0,
    precision="auto",
    seed=0,
    micro_batch_tokens=0,
    lora=None,
)
LOSS = LossSettings(
    divergence="reverse_kl",
    divergence_params=(),
    estimator="opd_plus",
    discount=0.0,
    ratio_clip=10.0,
    is_cap=2.0,
    aggregation="token_mean",
    center_cost=False,
    temperature=1.0,
    logprob_chunk=512,
    teacher_head=None,
)


def optim_settings(**changes) -> OptimSettings:
    return dataclasses.replace(OPTIM, **changes)


def loss_settings(**changes) -> LossSettings:
    """`LOSS` with `changes`; ``alpha=`` sets the Amari parameter, ``None`` clips mean off."""
    if "alpha" in changes:
        changes["divergence_params"] = (("alpha", changes.pop("alpha")),)
    return dataclasses.replace(LOSS, **changes)


def loss_of(model, batch, *, normaliser, logprob_chunk_size=None, **changes):
    """`learner.step.compute_loss` with `LOSS` changed by keyword (test shorthand)."""
    from learner.step import compute_loss

    if logprob_chunk_size is not None:
        changes["logprob_chunk"] = logprob_chunk_size
    return compute_loss(model, batch, settings=loss_settings(**changes), normaliser=normaliser)
