"""Weight publishing (the transport): the learner's weights reach every sampler under an
explicit version. Versions themselves are counted in ``services.versions``.

Two publishers, one interface (``publish(version, wait=)``, ``close()``):
- ``ObjectStorePublisher`` (the default on CPU, or any cluster without whole GPUs): rank 0
  exports named HF tensors, ``ray.put`` once, each sampler loads them in place
  (``reload_weights``), asynchronously;
- ``CollectivePublisher`` ("nccl" on whole GPUs, "gloo" on CPU): vLLM's native weight transfer
  broadcasts from learner rank 0 to every sampler engine (services/nccl_sync.py); the two
  backends run the same code with a different communicator.
Either fails with WeightSyncError after ``rollout.sync_timeout_s``; neither hangs.
"""

from __future__ import annotations

from typing import Protocol

from services.nccl_sync import COLLECTIVE, WeightSync, fixed_membership_error
from services.versions import WeightSyncError


class WeightPublisher(Protocol):
    backend: str

    def publish(self, version: int, *, wait: bool = False) -> None: ...

    def close(self) -> None: ...


class ObjectStorePublisher:
    backend = "object_store"

    def __init__(self, learner, rollout) -> None:
        self.learner, self.rollout = learner, rollout

    def publish(self, version: int, *, wait: bool = False) -> None:
        self.rollout.push_weights(self.learner.export_weights(), version, wait=wait)

    def close(self) -> None:
        pass


class CollectivePublisher:
    """Broadcasts to the samplers that formed the group; refuses once that set has changed
    (a sampler restarted or the pool resized), before a push could hang or mislabel one."""

    def __init__(
        self, learner, rollout, *, backend: str, timeout_s: float, wire_dtype: str
    ) -> None:
        self.backend = backend
        self.rollout, self.timeout_s = rollout, timeout_s
        self.sync = WeightSync(backend)
        self.sync.setup(
            learner.ranks[0],
            rollout.samplers,
            timeout_s,
            wire_dtype=wire_dtype,
            learner_peers=learner.ranks[1:],
        )

    def publish(self, version: int, *, wait: bool = False) -> None:
        del wait  # a broadcast completes on both sides before it returns
        members, live = self.sync.samplers, self.rollout.samplers
        if live != members:
            raise WeightSyncError(fixed_membership_error(self.backend, len(members), len(live)))
        self.sync.push(version, self.timeout_s)
        self.rollout.mark_served(version)

    def close(self) -> None:
        self.sync.close(self.timeout_s)


def make_weight_publisher(
    backend: str, learner, rollout, *, timeout_s: float, wire_dtype: str
) -> WeightPublisher:
    if backend in COLLECTIVE:
        return CollectivePublisher(
            learner, rollout, backend=backend, timeout_s=timeout_s, wire_dtype=wire_dtype
        )
    return ObjectStorePublisher(learner, rollout)
