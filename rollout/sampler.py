"""The student sampler as a plain object: an engine plus the building of ``Rollout`` records.

Usable without Ray (tests, the in-process mode); ``services.actors.StudentSamplerActor`` only
forwards calls to it. The unit of work is a *chunk*: consecutive prompt groups of one step
(a group = the ``n`` samples of one prompt). Sample ``k`` of the prompt at position ``pos``
of step ``s`` is drawn with seed ``chunk.seed + (pos - chunk.first_pos)``, i.e. a seed fixed
by (run seed, step, position), so a chunk re-run on another sampler draws the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from rollout.records import Rollout


@dataclass(frozen=True)
class WorkItem:
    """One prompt to sample: its ``n`` samples get ids ``<problem_id>/<k>``."""

    problem_id: str
    answer: str
    prompt_ids: tuple[int, ...]


@dataclass(frozen=True)
class SampleRequest:
    """How to sample a chunk (plain values from the run config)."""

    n: int
    max_tokens: int
    temperature: float
    seed: int  # seed of the chunk's first prompt; prompt i of the chunk uses seed + i


@dataclass(frozen=True)
class Faults:
    """Test-only faults injected into a worker (never set by a run config).

    delay_s:         sleep this long before each chunk/score call (a worker slow to respond).
    group_delay_s:   sleep this long per prompt group sampled (a sampler that is slower in
                     proportion to its work, as a slower device would be).
    fail_start_file: refuse to start while this file exists (a crash loop on restart).
    """

    delay_s: float = 0.0
    group_delay_s: float = 0.0
    fail_start_file: str = ""

    def check_start(self) -> None:
        import os

        if self.fail_start_file and os.path.exists(self.fail_start_file):
            raise RuntimeError(f"injected start-up fault ({self.fail_start_file} exists)")

    def delay(self) -> None:
        if self.delay_s > 0:
            time.sleep(self.delay_s)


class Sampler:
    """Student engine + Rollout building. ``version`` is the policy version it serves."""

    def __init__(self, engine, faults: Faults | None = None) -> None:
        self.engine = engine
        self.faults = faults or Faults()

    @classmethod
    def build(cls, settings, faults: Faults | None = None) -> Sampler:
        (faults or Faults()).check_start()
        from rollout.engine import StudentEngine

        return cls(StudentEngine(settings), faults)

    @property
    def version(self) -> int:
        return self.engine.version

    def sample(
        self, items: list[WorkItem], req: SampleRequest
    ) -> Iterator[tuple[int, list[Rollout]]]:
        """Yield ``(position in items, group)`` as each prompt's ``n`` samples finish.

        group: ``n`` Rollouts of one prompt, all stamped with the version that sampled them.
        """
        self.faults.delay()
        version = self.engine.version
        stream = self.engine.generate_stream(
            [list(it.prompt_ids) for it in items],
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            n=req.n,
            seed=req.seed,
        )
        for index, gens in stream:
            if self.faults.group_delay_s > 0:
                time.sleep(self.faults.group_delay_s)
            item = items[index]
            yield (
                index,
                [
                    Rollout(
                        sample_id=f"{item.problem_id}/{k}",
                        problem_id=item.problem_id,
                        answer=item.answer,
                        prompt_ids=item.prompt_ids,
                        response_ids=g.token_ids,
                        logp_sampler=g.logprobs,
                        policy_version=version,
                        finish_reason=g.finish_reason,
                    )
                    for k, g in enumerate(gens)
                ],
            )

    def generate(self, prompt_ids: list[list[int]], **kwargs):
        return self.engine.generate(prompt_ids, **kwargs)

    def load_weights(self, named_tensors, version: int) -> tuple[int, float]:
        """Load pushed weights; returns (version now served, seconds spent loading)."""
        seconds = self.engine.load_weights(named_tensors, version)
        return self.engine.version, seconds

    def close(self) -> None:
        self.engine.close()
