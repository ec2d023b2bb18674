"""Weight publishing (the transport): the learner's weights reach every sampler under an
explicit version. Versions themselves are counted in ``services.versions``.

Two publishers, one interface (``publish(version, wait=)``, ``next_batch(rollout, step,
trained=)``, ``close()``):
- ``ObjectStorePublisher`` (the default on CPU, or any cluster without whole GPUs): rank 0
  exports named HF tensors, ``ray.put`` once, each sampler loads them in place
  (``reload_weights``), asynchronously;
- ``CollectivePublisher`` ("nccl" on whole GPUs, "gloo" on CPU): vLLM's native weight transfer
  broadcasts from learner rank 0 to every sampler engine (services/nccl_sync.py); the two
  backends run the same code with a different communicator.
Either fails with WeightSyncError after ``rollout.sync_timeout_s``; neither hangs.

Restarts and resizing under a collective. A group's members are fixed when it forms, so when
the samplers change (a replacement after a death, one added or drained by ``opdplus scale``)
the publisher re-forms it at the next push, the learner being between steps: it closes the
group on learner rank 0 and on every member that stays, forms a new one with the current
members (a new port, the new world size) and pushes the current weights to all of them. A
sampler that was not in the group that received a version is not current
(``services.versions.Versions.awaits_push``): it takes no work until such a push reaches it.
When a sampler waits and the driver waits for a batch, the push comes at once (``next_batch``):
the learner holds exactly the version it last trained, so a run whose only sampler was replaced
does not stall until the next step.

Members are checked before every push (one that died unnoticed would break the broadcast or
leave the others blocked in the rendezvous; it is reported lost and left out); a member that dies during a push breaks the broadcast for the
others: they are killed (they may be blocked in it) and replaced like any dead sampler, and the
push is made again to a re-formed group. One case is refused: learner rank 0 still blocked in
the broken broadcast at the push's deadline (it cannot be replaced mid-run) stops the run with
WeightSyncError, as any failed push does.
"""

from __future__ import annotations

import time
from typing import Protocol

import ray
from ray.exceptions import RayActorError

from services.channel import StepTimeout
from services.nccl_sync import COLLECTIVE, LABELS, Push, WeightSync
from services.versions import WeightSyncError

JOIN_POLL_S = 1.0  # while the driver waits for a batch: how often it looks for waiting samplers
# Before every push: a call to a dead actor fails at once (its death is known to Ray by then), a
# live one answers, perhaps after its current chunk, which is not waited for beyond this.
LIVENESS_S = 0.1
SETTLE_S = 5.0  # after a push fails: how long the other sides get to answer or fail
ATTEMPTS = 4  # re-forms within one push (a member found dead, a member dead in the push)


class WeightPublisher(Protocol):
    backend: str

    def publish(self, version: int, *, wait: bool = False) -> None: ...

    def next_batch(self, rollout, step: int, *, trained: int): ...

    def metrics(self) -> dict: ...  # numbers for the step's metrics row

    def close(self) -> None: ...


class ObjectStorePublisher:
    backend = "object_store"

    def __init__(self, learner, rollout) -> None:
        self.learner, self.rollout = learner, rollout

    def publish(self, version: int, *, wait: bool = False) -> None:
        self.rollout.push_weights(self.learner.export_weights(), version, wait=wait)

    def next_batch(self, rollout, step: int, *, trained: int):
        del trained  # a replacement loads the latest weights from the object store itself
        return rollout.next_batch(step)

    def metrics(self) -> dict:
        return {}  # no group: every sampler loads from the object store

    def close(self) -> None:
        pass


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x == y for x, y in zip(a, b, strict=True))


class CollectivePublisher:
    """Broadcasts to the current samplers, re-forming the group whenever they changed.

    rollout: ``services.rollout_service.RolloutService`` (``collective_members``,
    ``mark_served(version, handles)``, ``collective_lost``). ``reforms`` records the seconds each
    re-form took (close + liveness check + new group), ``version`` the last version pushed.
    """

    def __init__(
        self, learner, rollout, *, backend: str, timeout_s: float, wire_dtype: str
    ) -> None:
        self.backend, self.label = backend, LABELS[backend]
        self.learner, self.rollout = learner, rollout
        self.timeout_s, self.wire_dtype = timeout_s, wire_dtype
        self.sync: WeightSync | None = None
        self.version = 0
        self.reforms: list[float] = []
        members, _ = rollout.collective_members()
        self._form(members)

    # ------------------------------------------------------------------ the interface

    def publish(self, version: int, *, wait: bool = False) -> None:
        del wait  # a broadcast completes on both sides before it returns
        if version < self.version:
            raise WeightSyncError(f"weight version {version} is older than {self.version}")
        self._push(version)

    def next_batch(self, rollout, step: int, *, trained: int):
        """``rollout.next_batch(step)``; meanwhile, whenever a sampler waits for the group's
        weights, push the learner's (version ``trained``: it is between steps) to a re-formed
        group. The step watchdog (``rollout.step_timeout_s``) still bounds the whole wait."""
        limit = rollout.plan.step_timeout_s
        end = time.monotonic() + limit if limit else None
        while True:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= JOIN_POLL_S:
                return rollout.next_batch(step, timeout=max(left, 0.001))
            try:
                return rollout.next_batch(step, timeout=JOIN_POLL_S)
            except StepTimeout:
                pass
            _, waiting = self.rollout.collective_members()
            if waiting:
                self._push(trained)

    def metrics(self) -> dict:
        """``sync/group_samplers``: the samplers in the weight group now (a resize shows here
        once the group has re-formed); ``sync/reforms``: groups re-formed so far."""
        members = 0 if self.sync is None else len(self.sync.samplers)
        return {"sync/group_samplers": members, "sync/reforms": len(self.reforms)}

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close(self.timeout_s)
            self.sync = None

    # ------------------------------------------------------------------ pushes

    def _push(self, version: int) -> None:
        last = "a member was found dead each time"
        again = version == self.version  # members that got a failed push may serve it too
        for _ in range(ATTEMPTS):
            members, _ = self.rollout.collective_members()
            dead = self._dead(members)
            if dead:
                self.rollout.collective_lost(
                    dead, f"found dead before a push over {self.label} (the group is re-formed)"
                )
                continue
            stale = self.sync is None or not self.sync.ready
            if (stale or not _same(members, self.sync.samplers)) and self._reform(members):
                continue  # a member died as the old group closed: read the members again
            if self.sync is None:  # no sampler is up: those that start wait for the next push
                self.version = max(self.version, version)
                self.rollout.mark_served(version, [])
                return
            # Members that serve ``version`` already (a re-formed group) receive it again.
            push = self.sync.start_push(version, self.timeout_s, repeat=again)
            try:
                push.wait()
            except WeightSyncError as exc:
                if not self._recover(push):
                    raise
                last, again = str(exc), True
                continue
            self.version = version
            self.rollout.mark_served(version, members)
            return
        raise WeightSyncError(
            f"weight push of version {version} over {self.label}: the samplers changed during "
            f"{ATTEMPTS} re-formed groups in a row; last: {last}"
        )

    def _form(self, members: list) -> None:
        if not members:
            return
        sync = WeightSync(self.backend)
        sync.setup(
            self.learner.ranks[0],
            members,
            self.timeout_s,
            wire_dtype=self.wire_dtype,
            learner_peers=self.learner.ranks[1:],
        )
        self.sync = sync

    def _reform(self, members: list) -> list:
        """Close the group on learner rank 0 and on the members that stay, form one with
        ``members`` (samplers that left have died or drain, their end went or goes with them).

        A member that dies while the old group closes (its death not seen before: a kill lands
        between the liveness check and the close) is reported lost and returned, and nothing is
        formed: the caller reads the members again. Any other close failure is raised."""
        t0 = time.monotonic()
        old, self.sync = self.sync, None
        if old is not None:
            staying = [h for h in old.samplers if h in members]
            try:
                old.close(self.timeout_s, samplers=staying)
            except WeightSyncError:
                dead = self._dead(staying)
                if not dead:
                    raise
                self.rollout.collective_lost(
                    dead, f"found dead as the {self.label} group closed to re-form (re-formed)"
                )
                return dead
        self._form(members)
        self.reforms.append(time.monotonic() - t0)
        from services.console import say

        say(
            f"[opdplus] {self.label} weight group re-formed with {len(members)} sampler(s) "
            f"in {self.reforms[-1]:.2f} s"
        )
        return []

    def _dead(self, handles: list) -> list:
        """The members whose actor is dead (``LIVENESS_S``)."""
        if not handles:
            return []
        refs = [h.version.remote() for h in handles]
        ray.wait(refs, num_returns=len(refs), timeout=LIVENESS_S)
        dead = []
        for h, ref in zip(handles, refs, strict=True):
            if ray.wait([ref], timeout=0)[0]:
                try:
                    ray.get(ref)
                except RayActorError:
                    dead.append(h)
        return dead

    def _recover(self, push: Push) -> bool:
        """After a failed push: if a sampler died in it, kill the members that did not finish
        (blocked in the broken broadcast, or half-way through loading), have them replaced,
        close the group on the rest, and return True so the push is made again. False when
        the failure is not a death, or learner rank 0 does not come out of the broadcast."""
        assert self.sync is not None
        calls, members = push.calls, self.sync.samplers
        calls.settle(min(calls.deadline, time.monotonic() + SETTLE_S))
        died = [
            label
            for label, exc in calls.failed.items()
            if label.startswith("sampler ") and isinstance(exc, RayActorError)
        ]
        if not died:
            return False
        if any(label.startswith("learner") for label in calls.pending()):
            calls.settle(calls.deadline)
            if any(label.startswith("learner") for label in calls.pending()):
                return False
        done = [h for i, h in enumerate(members) if f"sampler {i}" in calls.results]
        broken = [h for h in members if h not in done]
        for h in broken:
            ray.kill(h)
        self.rollout.collective_lost(
            broken,
            f"weight push of version {push.version} over {self.label}: {', '.join(died)} died "
            f"in it; the members that had not finished were stopped (blocked in the broadcast)",
        )
        sync, self.sync = self.sync, None
        sync.abandon(done, self.timeout_s)
        return True


def make_weight_publisher(
    backend: str, learner, rollout, *, timeout_s: float, wire_dtype: str
) -> WeightPublisher:
    if backend in COLLECTIVE:
        return CollectivePublisher(
            learner, rollout, backend=backend, timeout_s=timeout_s, wire_dtype=wire_dtype
        )
    return ObjectStorePublisher(learner, rollout)
