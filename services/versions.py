"""Policy versions on the rollout side: the one home of version and staleness arithmetic.

The policy version is the number of learner steps done. The learner trains step k on a batch
from version k − 1 (``trained_at``) and publishes version k afterwards (``published_after``). A
sample drawn at version v and trained at version v' has staleness v' − v (``staleness``). Step k
may be sampled by a worker serving version ≥ ``need(k)`` = k − 1 − max_staleness, so no sample
lags the learner by more than ``max_staleness``; 0 makes the pipeline strictly on-policy.
``tests/test_versions.py`` fails when this arithmetic is written anywhere else.

Resume: a checkpoint saves the version its weights are (``policy_version``) and the driver
publishes exactly that version on resume. At max_staleness = 0 a resumed run is then identical
to the uninterrupted one (same samples, tokens, losses, weights: tests/test_resume_exact.py).
At max_staleness = s > 0 it is not: which version samples step k (k − 1 − s .. k − 1) depends on
how far the producer had run ahead, and a resumed run starts with an empty pipeline, so the
first s steps after the resume are sampled from a newer policy than they were originally. The
prompts and sample ids are the same; the sampled tokens, losses and weights differ.

``Versions`` holds the published version and the latest weights' handle for the producer; the
transport that moves weights is ``services.weight_publisher``.

Collective pushes (nccl, gloo): a version reaches exactly the samplers in the group that
received it (``mark_external``). A sampler that was not in it (a replacement, an added one) is
not current: it waits, taking no work (``awaits_push``), until the publisher re-forms the group
with it and pushes the current weights again.
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


def published_after(step: int) -> int:
    """The policy version of the weights once ``step`` is trained."""
    return step


def staleness(trained_version: int, sampled_version: int) -> int:
    """How many policy versions a sample lags the learner: v' − v."""
    return trained_version - sampled_version


def step_staleness(step: int, sampled_version: int) -> int:
    """Staleness of a sample of ``sampled_version`` trained in ``step``."""
    return staleness(trained_at(step), sampled_version)


def need(step: int, max_staleness: int) -> int:
    """Lowest policy version allowed to sample ``step``."""
    return trained_at(step) - max_staleness


class Versions:
    """The published version, the latest weights' object-store handle, and which version each
    sampler serves or is loading (the producer's view of the samplers' policies)."""

    def __init__(self, calls, *, max_staleness: int, sync_timeout_s: float) -> None:
        self.calls = calls
        self.max_staleness = max_staleness
        self.sync_timeout_s = sync_timeout_s
        self.version = 0
        self.weights = None  # object ref (or tensors, in-process) of ``version``
        self.external = False  # versions delivered by a collective push (nccl, gloo)

    def need(self, step: int) -> int:
        return need(step, self.max_staleness)

    def admits(self, step: int, served: int) -> bool:
        return served >= self.need(step)

    def may_take(self, w: Worker, step: int) -> bool:
        # A load queued on the actor runs before any chunk sent after it (actor calls are FIFO).
        return max(w.version, w.loading) >= self.need(step)

    def publish(self, weights, version: int) -> None:
        if version <= self.version and self.weights is not None:
            raise WeightSyncError(f"weight version {version} is not newer than {self.version}")
        self.version, self.weights, self.external = version, weights, False

    def mark_external(self, version: int, samplers: list[Worker]) -> None:
        """``version`` was delivered by a collective broadcast (nccl, gloo) to ``samplers``:
        exactly the group that received it; no other sampler becomes current by it."""
        if version < self.version:
            raise WeightSyncError(f"weight version {version} is older than {self.version}")
        self.version, self.weights, self.external = version, None, True
        for w in samplers:
            w.version = w.loading = version

    def awaits_push(self, w: Worker) -> bool:
        """``w`` is behind a version that came by a collective push: it can get it only from
        the next push (to a group re-formed with it), not by a load of its own."""
        return self.external and max(w.version, w.loading) < self.version

    def load(self, w: Worker):
        """Send the latest weights to ``w`` (queued behind its current work); None if current."""
        if max(w.version, w.loading) >= self.version:
            return None
        if self.weights is None:
            raise WorkerFailed(
                f"{w.name} needs policy version {self.version}, which came by a collective "
                f"push: it waits for the next push (awaits_push), it cannot load it alone"
            )
        w.loading = self.version
        return self.calls.call(w.handle, "load_weights", self.weights, self.version)

    def loaded(self, w: Worker, version: int) -> None:
        w.version = max(w.version, version)

    def overdue(self, started: float) -> bool:
        return time.perf_counter() - started > self.sync_timeout_s
