"""The student sampler as a plain object: an engine plus the building of ``Rollout`` records.

Usable without Ray (tests, the in-process mode); ``services.actors.StudentSampler`` only
forwards calls to it. The unit of work is a *chunk*: consecutive prompt groups of one step
(a group = the ``n`` samples of one prompt). The prompt at position ``i`` of a chunk is drawn
with seed ``SampleRequest.seed + i``, and the producer sets that seed from (run seed, step,
position in the step) (``services.scheduler.chunk_seed``), so a chunk re-run on another
sampler draws the same tokens.
"""

from __future__ import annotations

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


class Sampler:
    """Student engine + Rollout building. ``version`` is the policy version it serves."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @classmethod
    def build(cls, spec) -> Sampler:
        """spec: ``rollout.engine.EngineSettings`` (or any object whose ``student_engine()``
        builds an engine with the StudentEngine methods)."""
        return cls(spec.student_engine())

    @property
    def version(self) -> int:
        return self.engine.version

    def sample(
        self, items: list[WorkItem], req: SampleRequest
    ) -> Iterator[tuple[int, list[Rollout]]]:
        """Yield ``(position in items, group)`` as each prompt's ``n`` samples finish.

        group: ``n`` Rollouts of one prompt, all stamped with the version that sampled them.
        """
        version = self.engine.version
        stream = self.engine.generate_stream(
            [list(it.prompt_ids) for it in items],
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            n=req.n,
            seed=req.seed,
        )
        for index, gens in stream:
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
