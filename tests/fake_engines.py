"""Test doubles of the engines, given to the real rollout tier through an engine spec.

Production builds engines through ``EngineSettings.student_engine()`` / ``teacher_engine()``;
a spec here builds these instead, so the real producer, scheduler, pool and channel run in
process with no vLLM (logic tests in milliseconds). ``FakeSpec`` is picklable but only meant
for ``in_process=True``: Ray workers would need this module importable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from rollout.engine import Generation
from rollout.records import TeacherScore


class FakeStudentEngine:
    """Samples ``length`` tokens per completion from a seeded RNG (seed + prompt index)."""

    def __init__(self, length: int) -> None:
        self.version, self.length, self.loads = 0, length, []

    def generate_stream(self, prompt_ids, *, max_tokens, temperature, n, seed):
        for i, _ in enumerate(prompt_ids):
            rng = random.Random(seed + i)
            gens = [
                Generation(
                    tuple(rng.randrange(3, 30) for _ in range(min(self.length, max_tokens))),
                    tuple(-1.0 for _ in range(min(self.length, max_tokens))),
                    "stop",
                )
                for _ in range(n)
            ]
            yield i, gens

    def generate(self, prompt_ids, *, max_tokens, temperature=1.0, n=1, seed=None):
        return [gens for _, gens in self.generate_stream(
            prompt_ids, max_tokens=max_tokens, temperature=temperature, n=n, seed=seed or 0
        )]  # fmt: skip

    def load_weights(self, named_tensors, version: int) -> float:
        self.loads.append(version)
        self.version = version
        return 0.0

    def close(self) -> None:
        pass


class FakeTeacherEngine:
    """Scores every response token −0.5; records the number of sequences of each call."""

    calls: list[int] = []  # class-level: the spec builds a new engine per scorer

    def score(self, prompt_ids, response_ids):
        FakeTeacherEngine.calls.append(len(response_ids))
        return [TeacherScore(tuple(-0.5 for _ in r)) for r in response_ids]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class FakeSpec:
    length: int = 4
    built: list = field(default_factory=list, compare=False)

    def student_engine(self) -> FakeStudentEngine:
        engine = FakeStudentEngine(self.length)
        self.built.append(engine)
        return engine

    def teacher_engine(self) -> FakeTeacherEngine:
        return FakeTeacherEngine()
