"""Policy versions and weight transport on the rollout side: the one home of version arithmetic.

Versions: the policy version is the number of learner steps done. The learner trains step k on
a batch from version k − 1 (``trained_at``) and publishes version k afterwards. A sample drawn
at version v and trained at version v' has staleness v' − v (``rollout.records.staleness``).
Step k may be sampled by a worker serving version ≥ ``need(k)`` = k − 1 − max_staleness, so no
sample lags the learner by more than ``max_staleness``; 0 makes the pipeline strictly on-policy.

Resume: a checkpoint saves the version its weights are (``policy_version``) and the driver
publishes exactly that version on resume. At max_staleness = 0 a resumed run is then identical
to the uninterrupted one (same samples, tokens, losses, weights: tests/test_resume_exact.py).
At max_staleness = s > 0 it is not: which version samples step k (k − 1 − s .. k − 1) depends on
how far the producer had run ahead, and a resumed run starts with an empty pipeline, so the
first s steps after the resume are sampled from a newer policy than they were originally. The
prompts and sample ids are the same; the sampled tokens, losses and weights differ.

Transport: the latest weights stay in the object store (one ``ray.put``; in the in-process mode
the tensors themselves), so a new or restarted sampler loads them before it takes work. With
the NCCL path the broadcast happens outside (services/weight_sync.py) and only the version is
recorded here; a replacement sampler cannot join a running NCCL group, so it fails clearly.
"""

from __future__ import annotations

import time

from services.errors import UserError
from services.pool import Worker, WorkerFailed


class WeightSyncError(UserError, RuntimeError):
    """A weight push did not complete in time (or a sampler failed while loading)."""


def trained_at(step: int) -> int:
    """The policy version the learner holds while it trains ``step``."""
    return step - 1


class Publisher:
    """Owns the published version, the latest weights' transport handle and pending loads."""

    def __init__(self, calls, *, max_staleness: int, sync_timeout_s: float) -> None:
        self.calls = calls
        self.max_staleness = max_staleness
        self.sync_timeout_s = sync_timeout_s
        self.version = 0
        self.weights = None  # object ref (or tensors, in-process) of ``version``
        self.external = False  # versions delivered by another path (NCCL)
        self.published_at = time.perf_counter()

    def need(self, step: int) -> int:
        """Lowest policy version allowed to sample ``step``."""
        return trained_at(step) - self.max_staleness

    def admits(self, step: int, served: int) -> bool:
        return served >= self.need(step)

    def may_take(self, w: Worker, step: int) -> bool:
        # A load queued on the actor runs before any chunk sent after it (actor calls are FIFO).
        return max(w.version, w.loading) >= self.need(step)

    def served(self, samplers: list[Worker]) -> int:
        """The version every live sampler serves (the published one when none is live)."""
        return min((w.version for w in samplers), default=self.version)

    def publish(self, weights, version: int) -> None:
        if version <= self.version and self.weights is not None:
            raise WeightSyncError(f"weight version {version} is not newer than {self.version}")
        self.version, self.weights, self.external = version, weights, False
        self.published_at = time.perf_counter()

    def mark_external(self, version: int, samplers: list[Worker]) -> None:
        """A version delivered by NCCL broadcast to every live sampler."""
        self.version, self.weights, self.external = version, None, True
        for w in samplers:
            w.version = w.loading = version

    def load(self, w: Worker):
        """Send the latest weights to ``w`` (queued behind its current work); None if current."""
        if max(w.version, w.loading) >= self.version:
            return None
        if self.weights is None:
            raise WorkerFailed(
                f"{w.name} needs policy version {self.version} but the weights were sent by "
                f"NCCL broadcast, which a replacement sampler cannot join mid-run; use "
                f"rollout.sync_backend = 'object_store' for restarts and resizing"
            )
        w.loading = self.version
        return self.calls.call(w.handle, "load_weights", self.weights, self.version)

    def loaded(self, w: Worker, version: int) -> None:
        w.version = max(w.version, version)

    def overdue(self, started: float) -> bool:
        return time.perf_counter() - started > self.sync_timeout_s
