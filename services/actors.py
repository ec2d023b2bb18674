"""Ray actors: thin shells over the plain ``rollout.sampler.Sampler`` / ``rollout.scorer.Scorer``.

An actor forwards calls and owns process-level concerns (resources, naming, restart policy);
the work is done by the plain objects, which also run without Ray (the in-process mode).

Restarts: actors are created with ``max_restarts=0`` on purpose. ``services.pool`` replaces a
dead worker itself (up to ``rollout.max_restarts`` per slot) because a replacement must be
counted, must get its in-flight work re-dispatched, and must load the current weights before it
takes work; a silent Ray restart would bring back a sampler at policy version 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import ray

from rollout.records import Rollout, ScoredRollout
from rollout.sampler import Sampler, SampleRequest, WorkItem
from rollout.scorer import Scorer

__all__ = ["StudentSampler", "TeacherScorer", "WorkItem", "actor_options"]


def actor_options(name: str | None, resources: dict) -> dict:
    """``.options()`` for a pool worker: the role's resource dict (num_cpus, num_gpus,
    custom ``resources``) as configured, a dashboard name, and no Ray-side restarts."""
    opts = dict(resources)
    opts.update(max_restarts=0, max_task_retries=0)
    if name:
        opts["name"] = name
    return opts


@ray.remote
class StudentSampler:
    """Runs one ``rollout.sampler.Sampler`` (one vLLM student engine)."""

    def __init__(self, spec) -> None:
        """spec: rollout.engine.EngineSettings (or a spec with the same ``student_engine``)."""
        self.sampler = Sampler.build(spec)
        self.receiver = None  # rollout.weight_transfer.WeightReceiver, collective path only

    def version(self) -> int:
        return self.sampler.version

    def sample_stream(
        self, items: list[WorkItem], req: SampleRequest
    ) -> Iterator[tuple[int, list[Rollout]]]:
        """Streams ``(position, group)`` as each prompt's samples finish (``num_returns="streaming"``)."""
        yield from self.sampler.sample(items, req)

    def generate(self, prompt_ids: list[list[int]], **kwargs):
        return self.sampler.generate(prompt_ids, **kwargs)

    def load_weights(self, named_tensors, version: int) -> tuple[int, float]:
        """Load pushed weights; returns (version now served, seconds spent loading)."""
        return self.sampler.load_weights(named_tensors, version)

    # Collective path (services/nccl_sync.py): weights arrive by broadcast from learner rank 0,
    # over NCCL on GPUs or gloo on CPU (the engine was built with that weight_transfer).
    def collective_init_receiver(
        self, master_address: str, master_port: int, rank_offset: int, world_size: int
    ) -> None:
        """Join the learner's weight group as rank ``rank_offset`` (blocks until all ranks join)."""
        from rollout.weight_transfer import WeightReceiver

        self.receiver = WeightReceiver(
            self.sampler.engine, master_address, master_port, rank_offset, world_size
        )

    def collective_receive_weights(
        self, meta, version: int, repeat: bool = False
    ) -> tuple[int, float]:
        """Receive one broadcast (meta: rollout.weight_transfer.WeightMeta); returns (version
        served, seconds). repeat: ``version`` again, for a group re-formed around a new member."""
        if self.receiver is None:
            raise RuntimeError("collective_init_receiver was not called on this sampler")
        seconds = self.receiver.receive(meta, version, repeat=repeat)
        return self.sampler.version, seconds

    def collective_close_receiver(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


@ray.remote
class TeacherScorer:
    """Runs one ``rollout.scorer.Scorer`` (one vLLM teacher engine)."""

    def __init__(self, spec) -> None:
        """spec: rollout.engine.EngineSettings (or a spec with the same ``teacher_engine``)."""
        self.scorer = Scorer.build(spec)

    def score(self, rollouts: list[Rollout]) -> tuple[list[ScoredRollout], float]:
        """Teacher outputs for each rollout; also returns the seconds spent scoring."""
        return self.scorer.score(rollouts)

    def generate(self, prompt_ids: list[list[int]], **kwargs):
        """The teacher's own completions (evaluation: its greedy answers)."""
        return self.scorer.generate(prompt_ids, **kwargs)

    def ready(self) -> bool:
        """Answers once the engine is up, so start-up errors surface at construction."""
        return True
