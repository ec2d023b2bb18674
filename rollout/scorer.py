"""The teacher scorer as a plain object: an engine plus the building of ``ScoredRollout``s.

Usable without Ray (tests, the in-process mode); ``services.actors.TeacherScorer`` only
forwards calls to it. The engine returns one ``rollout.records.TeacherScore`` per sequence.
"""

from __future__ import annotations

import time

from rollout.records import Rollout, ScoredRollout


class Scorer:
    """Teacher engine + ScoredRollout building."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @classmethod
    def build(cls, spec) -> Scorer:
        """spec: ``rollout.engine.EngineSettings`` (or any object whose ``teacher_engine()``
        builds an engine with ``score`` and ``close``)."""
        return cls(spec.teacher_engine())

    def score(self, rollouts: list[Rollout]) -> tuple[list[ScoredRollout], float]:
        """Teacher outputs for each rollout; also returns the seconds spent scoring."""
        t0 = time.perf_counter()
        results = self.engine.score(
            [list(r.prompt_ids) for r in rollouts], [list(r.response_ids) for r in rollouts]
        )
        seconds = time.perf_counter() - t0
        scored = [res.scored(r) for r, res in zip(rollouts, results, strict=True)]
        return scored, seconds

    def generate(self, prompt_ids: list[list[int]], **kwargs):
        """The teacher's own completions (``TeacherEngine.generate``; evaluation)."""
        return self.engine.generate(prompt_ids, **kwargs)

    def close(self) -> None:
        self.engine.close()
