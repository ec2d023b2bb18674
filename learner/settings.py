"""The learner's settings, one frozen object per concern, built from the config in one place
(`services.parts.learner_settings`) and handed to every rank once, at construction.

No field has a default here: the config tree (`services/config.py`) is the one home of
defaults and of validation, so the layers cannot disagree. Plain values only (they travel to
the rank actors); imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OptimSettings:
    """How a rank optimises (`learner.engine.LearnerEngine`).

    zero_stage: DeepSpeed ZeRO stage 0–3. lr, betas, weight_decay: AdamW (decay on matrices
    only). lr_schedule: "constant" | "cosine" after `warmup_steps` of linear warm-up, over
    `total_steps` (`learner.schedule`). grad_clip: global gradient-norm clip (0 = off).
    precision: "auto" | "bf16" | "fp32". seed: torch seed before the model loads.
    micro_batch_tokens: token budget per micro-batch (`learner.microbatch`); 0 = a rank's
    whole shard in one forward pass. lora: train LoRA adapters only (`learner.lora`); None =
    full fine-tuning.
    """

    zero_stage: int
    lr: float
    lr_schedule: str
    warmup_steps: int
    total_steps: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    precision: str
    seed: int
    micro_batch_tokens: int
    lora: LoraSettings | None


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (`learner.lora`): W + (alpha / rank)·B·A on each module named in
    `target_modules` (full module names, resolved against the student by
    `learner.lora.resolve_targets`). dropout: on the adapters' input while training."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class LossSettings:
    """What the loss needs (`learner.step.compute_loss`), fixed for a run.

    divergence (+ divergence_params, e.g. (("alpha", 0.5),)): a name in the divergence
    registry. estimator: "opd_plus" | "opd". discount: γ ∈ [0, 1]. ratio_clip: clamp of ell
    (None = off). is_cap: importance-weight cap (None = off). aggregation: "token_mean" |
    "seq_mean". center_cost: OPD+ immediate cost minus f'(1) (`learner.advantages`).
    temperature: the sampling τ; the student policy is softmax(logits / τ).
    logprob_chunk: positions per output-layer chunk (`learner.logprobs`); 0 = full logits.
    teacher_head: distill.teacher_topk = "full" (OPD+ over the full vocabulary from the
    teacher's hidden states, `learner.teacher_head.full_batch_loss`); None = the batch's
    teacher log-probs (sampled token or top-K).
    """

    divergence: str
    divergence_params: tuple[tuple[str, float], ...]
    estimator: str
    discount: float
    ratio_clip: float | None
    is_cap: float | None
    aggregation: str
    center_cost: bool
    temperature: float
    logprob_chunk: int
    teacher_head: TeacherHeadSettings | None

    def get_divergence(self):
        """The `learner.divergences.Divergence` these settings name."""
        from learner.divergences import get_divergence

        return get_divergence(self.divergence, **dict(self.divergence_params))


@dataclass(frozen=True)
class TeacherHeadSettings:
    """The teacher's output layer in the learner (`learner.teacher_head.load_teacher_head`,
    loaded once per rank). teacher_path: the teacher's HF folder. teacher_temperature: τ_T,
    applied here (the scorers hand on hidden states unscaled): π_T = softmax(W_T h / τ_T)."""

    teacher_path: str
    teacher_temperature: float
