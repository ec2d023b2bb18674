"""The teacher scorer as a plain object: an engine plus the building of ``ScoredRollout``s.

Generic over what ``TeacherEngine.score`` returns per sequence: a sequence of floats is the
teacher log-prob of each response token (``logp_teacher``); a mapping is taken as the
ScoredRollout's fields by name (e.g. log-probs plus the teacher's top-K), so the engine can
grow outputs without this file changing.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from rollout.records import Rollout, ScoredRollout
from rollout.sampler import Faults


def to_scored(rollout: Rollout, result) -> ScoredRollout:
    """One ScoredRollout from one sequence's ``score`` result (see module docstring)."""
    if isinstance(result, Mapping):
        fields = dict(result)
        if "logp_teacher" in fields:
            fields["logp_teacher"] = tuple(fields["logp_teacher"])
        return ScoredRollout(rollout=rollout, **fields)
    return ScoredRollout(rollout=rollout, logp_teacher=tuple(result))


class Scorer:
    """Teacher engine + ScoredRollout building."""

    def __init__(self, engine, faults: Faults | None = None) -> None:
        self.engine = engine
        self.faults = faults or Faults()

    @classmethod
    def build(cls, settings, faults: Faults | None = None) -> Scorer:
        (faults or Faults()).check_start()
        from rollout.engine import TeacherEngine

        return cls(TeacherEngine(settings), faults)

    def score(self, rollouts: list[Rollout]) -> tuple[list[ScoredRollout], float]:
        """Teacher outputs for each rollout; also returns the seconds spent scoring."""
        self.faults.delay()
        t0 = time.perf_counter()
        results = self.engine.score(
            [list(r.prompt_ids) for r in rollouts], [list(r.response_ids) for r in rollouts]
        )
        seconds = time.perf_counter() - t0
        scored = [to_scored(r, res) for r, res in zip(rollouts, results, strict=True)]
        return scored, seconds

    def close(self) -> None:
        self.engine.close()
