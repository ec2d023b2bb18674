"""Ray actors: thin shells over the plain engines in ``rollout.engine``.

An actor forwards calls and owns process-level concerns (resources, naming); the work is
done by StudentEngine / TeacherEngine, which also run without Ray.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import ray

from rollout.records import Rollout, ScoredRollout


@dataclass(frozen=True)
class WorkItem:
    """One prompt to sample: ``n`` samples get ids ``<problem_id>/<k>``."""

    problem_id: str
    answer: str
    prompt_ids: tuple[int, ...]


@ray.remote
class StudentSampler:
    """Runs one vLLM student engine; streams Rollouts as each prompt's samples finish."""

    def __init__(self, settings) -> None:
        from rollout.engine import StudentEngine

        self.engine = StudentEngine(settings)
        self.nccl_receiver = None

    def version(self) -> int:
        return self.engine.version

    def sample_stream(
        self, items: list[WorkItem], *, n: int, max_tokens: int, temperature: float, seed: int
    ) -> Iterator[list[Rollout]]:
        version = self.engine.version
        stream = self.engine.generate_stream(
            [list(it.prompt_ids) for it in items],
            max_tokens=max_tokens,
            temperature=temperature,
            n=n,
            seed=seed,
        )
        for index, gens in stream:
            item = items[index]
            yield [
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
            ]

    def generate(self, prompt_ids: list[list[int]], **kwargs):
        return self.engine.generate(prompt_ids, **kwargs)

    def load_weights(self, named_tensors, version: int) -> tuple[int, float]:
        """Load pushed weights; returns (version now served, seconds spent loading)."""
        seconds = self.engine.load_weights(named_tensors, version)
        return self.engine.version, seconds

    # GPU path (services/nccl_sync.py): weights arrive by NCCL broadcast from learner rank 0.
    def nccl_init_receiver(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int
    ) -> None:
        """Join the learner's NCCL weight group as rank ``rank_offset`` (blocks until all ranks join)."""
        from rollout.engine import NcclWeightReceiver

        self.nccl_receiver = NcclWeightReceiver(
            self.engine, master_address, master_port, rank_offset, world_size
        )

    def nccl_receive_weights(self, meta, version: int) -> tuple[int, float]:
        """Receive one broadcast (meta: rollout.engine.WeightMeta); returns (version served, seconds)."""
        if self.nccl_receiver is None:
            raise RuntimeError("nccl_init_receiver was not called on this sampler")
        seconds = self.nccl_receiver.receive(meta, version)
        return self.engine.version, seconds

    def nccl_close_receiver(self) -> None:
        if self.nccl_receiver is not None:
            self.nccl_receiver.close()
            self.nccl_receiver = None


@ray.remote
class TeacherScorer:
    """Runs one vLLM teacher engine; adds teacher log-probs to rollouts."""

    def __init__(self, settings) -> None:
        from rollout.engine import TeacherEngine

        self.engine = TeacherEngine(settings)

    def score(self, rollouts: list[Rollout]) -> tuple[list[ScoredRollout], float]:
        """Teacher log-probs for each rollout; also returns the seconds spent scoring."""
        t0 = time.perf_counter()
        logps = self.engine.score(
            [list(r.prompt_ids) for r in rollouts], [list(r.response_ids) for r in rollouts]
        )
        seconds = time.perf_counter() - t0
        scored = [
            ScoredRollout(rollout=r, logp_teacher=tuple(lp))
            for r, lp in zip(rollouts, logps, strict=True)
        ]
        return scored, seconds

    def ready(self) -> bool:
        """Answers once the engine is up, so start-up errors surface at construction."""
        return True
