"""The teacher scorer as a plain object: an engine plus the building of ``ScoredRollout``s.

Usable without Ray (tests, the in-process mode); ``services.actors.TeacherScorer`` only
forwards calls to it. The engine returns one ``rollout.records.TeacherScore`` per sequence.

distill.teacher_topk = "full": the engine is a ``rollout.engine.TeacherHiddenEngine`` (the
teacher's final hidden states [R, H] per sample, no log-prob lists). The scorer then also
loads the teacher's output layer once (``learner.teacher_head``) and computes log π_T of each
sampled token from the hidden states at τ_T, so every record carries ``logp_teacher`` as in
the other modes (the learner's ``ell`` statistics, prompt-only evaluation's sampled reverse KL)
and its hidden states for the learner's full-vocabulary loss.
"""

from __future__ import annotations

import time

from rollout.records import Rollout, ScoredRollout, TeacherScore
from services.errors import EngineError


class Scorer:
    """Teacher engine + ScoredRollout building."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.head = _teacher_head(engine) if hasattr(engine, "hidden_states") else None

    @classmethod
    def build(cls, spec) -> Scorer:
        """spec: ``rollout.engine.EngineSettings`` (or any object whose ``teacher_engine()``
        builds an engine with ``score`` and ``close``)."""
        return cls(spec.teacher_engine())

    def score(self, rollouts: list[Rollout]) -> tuple[list[ScoredRollout], float]:
        """Teacher outputs for each rollout; also returns the seconds spent scoring."""
        t0 = time.perf_counter()
        prompts = [list(r.prompt_ids) for r in rollouts]
        responses = [list(r.response_ids) for r in rollouts]
        if self.head is None:
            results = self.engine.score(prompts, responses)
        else:
            results = self._score_hidden(prompts, responses)
        seconds = time.perf_counter() - t0
        scored = [res.scored(r) for r, res in zip(rollouts, results, strict=True)]
        return scored, seconds

    def _score_hidden(self, prompts: list[list[int]], responses: list[list[int]]):
        import torch

        from learner.teacher_head import teacher_logprobs

        states = self.engine.hidden_states(prompts, responses)
        tau = self.engine.settings.teacher_temperature
        results = []
        for response, h_RH in zip(responses, states, strict=True):
            sampled = teacher_logprobs(
                self.head, h_RH, targets_N=torch.tensor(response, dtype=torch.int64),
                temperature=tau,
            ).sampled_N  # fmt: skip
            results.append(TeacherScore(tuple(sampled.tolist()), hidden=h_RH))
        return results

    def generate(self, prompt_ids: list[list[int]], **kwargs):
        """The teacher's own completions (``TeacherEngine.generate``; evaluation)."""
        if self.head is not None:
            raise EngineError(
                'a hidden-state teacher scorer (distill.teacher_topk = "full") cannot generate: '
                "the teacher's greedy answers (prompt-only evaluation) need distill.teacher_topk "
                "= 0 or K"
            )
        return self.engine.generate(prompt_ids, **kwargs)

    def close(self) -> None:
        self.engine.close()


def _teacher_head(engine):
    """The teacher's output layer (float32, the tokenizer's rows) for a hidden-state engine."""
    from pathlib import Path

    import torch

    from learner.teacher_head import load_teacher_head
    from models.checks import tokenizer_length

    path = engine.settings.model_path
    rows = tokenizer_length(path) if (Path(path) / "tokenizer.json").is_file() else None
    return load_teacher_head(path, vocab_size=rows, dtype=torch.float32)
