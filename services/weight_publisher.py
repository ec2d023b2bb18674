"""Weight publishing (the transport): the learner's weights reach every sampler under an
explicit version. Versions themselves are counted in ``services.versions``.

Two publishers, one interface (``publish(version, wait=)``, ``close()``):
- ``ObjectStorePublisher`` (CPU, or any cluster without whole GPUs): rank 0 exports named HF
  tensors, ``ray.put`` once, each sampler loads them in place (``reload_weights``),
  asynchronously;
- ``NcclPublisher`` (whole GPUs on samplers and learner): vLLM's native weight transfer
  broadcasts from learner rank 0 to every sampler engine (services/nccl_sync.py).
Either fails with WeightSyncError after ``rollout.sync_timeout_s``; neither hangs.
"""

from __future__ import annotations

from typing import Protocol


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


class NcclPublisher:
    backend = "nccl"

    def __init__(self, learner, rollout, *, timeout_s: float, wire_dtype: str) -> None:
        from services.nccl_sync import NcclWeightSync

        self.rollout, self.timeout_s = rollout, timeout_s
        self.sync = NcclWeightSync()
        self.sync.setup(
            learner.ranks[0],
            rollout.samplers,
            timeout_s,
            wire_dtype=wire_dtype,
            learner_peers=learner.ranks[1:],
        )

    def publish(self, version: int, *, wait: bool = False) -> None:
        del wait  # a broadcast completes on both sides before it returns
        self.sync.push(version, self.timeout_s)
        self.rollout.mark_served(version)

    def close(self) -> None:
        self.sync.close(self.timeout_s)


def make_weight_publisher(
    backend: str, learner, rollout, *, timeout_s: float, wire_dtype: str
) -> WeightPublisher:
    if backend == "nccl":
        return NcclPublisher(learner, rollout, timeout_s=timeout_s, wire_dtype=wire_dtype)
    return ObjectStorePublisher(learner, rollout)
