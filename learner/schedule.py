"""Learning-rate schedules, shared by the learner and the model builders' SFT. Pure Python."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine")


def lr_at(
    step: int,
    *,
    peak_lr: float,
    schedule: str,
    warmup_steps: int,
    total_steps: int,
    min_ratio: float = 0.0,
) -> float:
    """The learning rate before optimizer step `step` (0-based).

    Linear warm-up peak·(step+1)/warmup_steps for step < warmup_steps, then peak (constant) or
    the cosine peak·(m + (1 − m)·½(1 + cos(π·p))) with p = (step − warmup)/(total − warmup)
    clipped to [0, 1] and m = min_ratio (the floor the cosine decays to).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid: {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """`lr_at` with peak 1: the multiplier a LambdaLR scheduler applies to the peak lr."""
    return lr_at(
        step, peak_lr=1.0, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps
    )
