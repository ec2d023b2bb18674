"""Collective weight sync: the learner's rank 0 broadcasts new weights to every sampler engine,
over NCCL (GPUs) or gloo (CPU) — one path, the communicator chosen by name.

The data plane is vLLM's weight-transfer engine pair for the backend
(``rollout.weight_transfer.WeightSender`` / ``WeightReceiver``); this module is the control
plane. It makes one Ray call per side, each under a deadline (services/deadline_calls.py), so
a push that cannot finish raises ``WeightSyncError`` naming the side that did not finish,
instead of hanging the driver.

Group layout: rank 0 = learner rank 0 (sender); rank 1 + i = sampler i (one vLLM worker per
engine). A push is two steps submitted together: every learner rank exports its weights (a
collective under ZeRO-3; rank 0 keeps them and returns their ``WeightMeta``), then rank 0
broadcasts while every sampler receives. The samplers get the metadata by Ray passing rank 0's
export result straight into their call, so the driver never blocks between the two steps.

Actor methods this module calls (the actor protocol):

* learner rank 0: ``collective_sender_address() -> (ip, port)``,
  ``collective_init_sender(master_address, master_port, world_size, dtype, backend)``,
  ``collective_stage_weights(is_sender) -> WeightMeta | None``,
  ``collective_send_weights() -> seconds``, ``collective_close_sender()``. Other learner
  ranks: ``collective_stage_weights(False)``.
* each sampler: ``collective_init_receiver(master_address, master_port, rank_offset,
  world_size)``, ``collective_receive_weights(meta, version[, repeat]) -> (version served,
  seconds)``, ``collective_close_receiver()``.

A collective call that never meets its peer cannot be cancelled (NCCL never returns; gloo
returns after ``rollout.weight_transfer.GLOO_TIMEOUT_S``): after a failed setup or push the
group (and the actors blocked in it) is unusable, and every later call here refuses at once.
Recover by killing and restarting the learner and sampler actors.

The group's members are fixed when it forms. A changed sampler set (a replacement after a death,
a resize) is served by a new group: ``services.weight_publisher.CollectivePublisher`` closes this
one and forms another with the current members (``WeightSync`` is one group's lifetime), then
pushes the current weights to all of them (``start_push(..., repeat=True)`` when the version is
the one the old members already serve).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from services.config import SYNC_BACKENDS, nccl_fits
from services.deadline_calls import DeadlineCalls, check_timeout
from services.versions import WeightSyncError

SENDER = "learner rank 0 (sender)"
# The backends that move weights by a collective broadcast (rollout.weight_transfer.BACKENDS).
COLLECTIVE = ("nccl", "gloo")
LABELS = {"nccl": "NCCL", "gloo": "gloo"}


def _recovery_hint(label: str) -> str:
    return (
        f"the {label} group is unusable now (a peer may be blocked inside a collective); "
        "kill and restart the learner and sampler actors"
    )


def resolve_sync_backend(requested: str, *, sampler_gpus: float, learner_gpus: float) -> str:
    """The weight-sync path the driver should use: "nccl", "gloo" or "object_store".

    requested: ``rollout.sync_backend``. sampler_gpus / learner_gpus: GPUs per sampler actor and
    per learner rank. The NCCL path needs whole GPUs on both sides (``services.config.nccl_fits``).
    "auto" picks NCCL exactly when that holds, the object store otherwise. On CPU gloo can be
    faster (bench/weight_sync.py, 2 busy cores: SmolLM2 student 248 ms vs 419 ms a push, toy
    student 29 vs 24 ms) but on the toy pair it is slower, and a changed sampler set costs a
    re-formed group (services/weight_publisher.py); the object store stays the CPU default.
    "gloo" runs anywhere, opted into by name.
    """
    if requested not in SYNC_BACKENDS:
        raise ValueError(f"sync backend must be one of {SYNC_BACKENDS}, got {requested!r}")
    whole_gpus = nccl_fits(sampler_gpus, learner_gpus)
    if requested == "nccl" and not whole_gpus:
        raise ValueError(
            "rollout.sync_backend = 'nccl' needs at least one whole GPU per sampler and per "
            f"learner rank (got sampler_gpus={sampler_gpus}, learner gpus_per_rank={learner_gpus}): "
            "NCCL refuses two ranks on one device"
        )
    if requested == "auto":
        return "nccl" if whole_gpus else "object_store"
    return requested


@dataclass(frozen=True)
class PushReport:
    """A finished push: the version every sampler now serves and where the time went."""

    version: int
    sampler_versions: tuple[int, ...]
    send_s: float
    receive_s: tuple[float, ...]
    wall_s: float


class Push:
    """One push in flight. ``poll()`` returns None while it runs; both raise WeightSyncError."""

    def __init__(
        self, sync: WeightSync, version: int, calls: DeadlineCalls, num_samplers: int
    ) -> None:
        self._sync = sync
        self.version = version
        self._calls = calls
        self._num_samplers = num_samplers
        self._report: PushReport | None = None

    @property
    def calls(self) -> DeadlineCalls:
        """The push's calls by side (which answered, failed or are still pending)."""
        return self._calls

    def poll(self) -> PushReport | None:
        """The report if every side has finished, None if still within the deadline."""
        return self._finish(block=False)

    def wait(self) -> PushReport:
        """Block until every side has finished (or the deadline passes)."""
        report = self._finish(block=True)
        assert report is not None  # a blocking poll returns only when done, else raises
        return report

    def _finish(self, *, block: bool) -> PushReport | None:
        if self._report is not None:
            return self._report
        try:
            if not self._calls.poll(block):
                return None
        except WeightSyncError as exc:
            self._sync._fail(str(exc))
            raise
        results = self._calls.results
        received = [results[f"sampler {i}"] for i in range(self._num_samplers)]
        versions = tuple(int(v) for v, _ in received)
        if any(v != self.version for v in versions):
            message = f"weight push of version {self.version}: samplers report versions {versions}"
            self._sync._fail(message)
            raise WeightSyncError(message)
        self._report = PushReport(
            version=self.version,
            sampler_versions=versions,
            send_s=float(results[SENDER]),
            receive_s=tuple(float(s) for _, s in received),
            wall_s=time.monotonic() - self._calls.started,
        )
        self._sync._pushed(self)
        return self._report


class WeightSync:
    """Owns the weight group between the learner's rank 0 and the sampler engines.

    backend: "nccl" or "gloo" (the same calls; only the communicator differs). ``setup`` once,
    then ``push`` (blocking) or ``start_push`` (returns a ``Push`` to poll) each time new
    weights should be served. One push is in flight at a time.
    """

    def __init__(self, backend: str = "nccl") -> None:
        if backend not in COLLECTIVE:
            raise ValueError(f"collective backend must be one of {COLLECTIVE}, got {backend!r}")
        self.backend = backend
        self.label = LABELS[backend]
        self.hint = _recovery_hint(self.label)
        self._learner = None
        self._peers: list = []
        self._samplers: list = []
        self._failure: str | None = None
        self._pending: Push | None = None
        self.version = 0
        self.address: tuple[str, int] | None = None

    @property
    def ready(self) -> bool:
        return self._learner is not None and self._failure is None

    @property
    def samplers(self) -> list:
        """The samplers the group was formed with (rank 1 + i is ``samplers[i]``)."""
        return list(self._samplers)

    def setup(
        self,
        learner_rank0,
        sampler_actors: Sequence,
        timeout_s: float,
        *,
        wire_dtype: str = "float32",
        learner_peers: Sequence = (),
    ) -> None:
        """Form the group: rank 0 on ``learner_rank0``'s node, then every side joins at once.

        wire_dtype: dtype on the wire (the samplers' engine dtype). learner_peers: the other
        learner ranks, which must take part in every export (ZeRO-3 gathers are collective).
        """
        check_timeout(timeout_s)
        if self._learner is not None:
            raise WeightSyncError(f"{self.label} weight sync is already set up")
        self._check_usable()
        samplers = list(sampler_actors)
        if not samplers:
            raise ValueError(f"{self.label} weight sync needs at least one sampler actor")
        address = DeadlineCalls(
            f"{self.label} setup (sender address)",
            {"learner rank 0 (address)": learner_rank0.collective_sender_address.remote()},
            timeout_s,
            hint=self.hint,
        )
        try:
            address.poll(block=True)
        except WeightSyncError as exc:
            self._fail(str(exc))
            raise
        host, port = address.results["learner rank 0 (address)"]
        started = address.started
        world_size = 1 + len(samplers)
        init = learner_rank0.collective_init_sender.remote(
            host, port, world_size, wire_dtype, self.backend
        )
        calls = {SENDER: init}
        for i, sampler in enumerate(samplers):
            calls[f"sampler {i}"] = sampler.collective_init_receiver.remote(
                host, port, 1 + i, world_size
            )
        join = DeadlineCalls(
            f"{self.label} setup ({world_size} ranks at {host}:{port})",
            calls,
            timeout_s,
            started,
            hint=self.hint,
        )
        try:
            join.poll(block=True)
        except WeightSyncError as exc:
            self._fail(str(exc))
            raise
        self._learner = learner_rank0
        self._peers = list(learner_peers)
        self._samplers = samplers
        self.address = (host, port)

    def start_push(self, version: int, timeout_s: float, *, repeat: bool = False) -> Push:
        """Submit a push of the learner's current weights as ``version``; returns at once.

        Waits first for the previous push, if any, to finish. repeat: ``version`` may equal the
        last one pushed (a group re-formed around a new member gets the current weights again;
        members that serve them already receive the same weights).
        """
        check_timeout(timeout_s)
        self._check_usable()
        if self._learner is None:
            raise WeightSyncError(f"{self.label} weight sync is not set up: call setup() first")
        if self._pending is not None:
            self._pending.wait()
        if version < self.version or (version == self.version and not repeat):
            raise ValueError(f"weight version {version} is not newer than {self.version}")
        meta = self._learner.collective_stage_weights.remote(True)
        calls = {"learner rank 0 (export)": meta}
        for k, peer in enumerate(self._peers, start=1):
            calls[f"learner rank {k} (export)"] = peer.collective_stage_weights.remote(False)
        # Queued behind the export on the same actor; the samplers' calls start once `meta`
        # (rank 0's export) is ready, because Ray resolves object refs passed as arguments.
        calls[SENDER] = self._learner.collective_send_weights.remote()
        args = (meta, version, True) if repeat else (meta, version)
        for i, sampler in enumerate(self._samplers):
            calls[f"sampler {i}"] = sampler.collective_receive_weights.remote(*args)
        what = f"weight push of version {version} over {self.label}"
        pending = DeadlineCalls(what, calls, timeout_s, hint=self.hint)
        self._pending = Push(self, version, pending, len(self._samplers))
        return self._pending

    def push(self, version: int, timeout_s: float, *, repeat: bool = False) -> PushReport:
        """Push the learner's current weights as ``version`` and wait until every sampler serves it."""
        return self.start_push(version, timeout_s, repeat=repeat).wait()

    def close(self, timeout_s: float, *, samplers: Sequence | None = None) -> None:
        """Leave the group on every side. After a failure the actors may be blocked, so nothing is called.

        samplers: the members to call (default: all); a member that died or was stopped is left
        out, its end of the group went with its process.
        """
        check_timeout(timeout_s)
        if self._learner is None or self._failure is not None:
            self._learner = None
            return
        if self._pending is not None:
            self._pending.wait()
        keep = self._samplers if samplers is None else list(samplers)
        calls = {SENDER: self._learner.collective_close_sender.remote()}
        for i, sampler in enumerate(self._samplers):
            if any(sampler == k for k in keep):
                calls[f"sampler {i}"] = sampler.collective_close_receiver.remote()
        self._learner = None
        DeadlineCalls(f"{self.label} teardown", calls, timeout_s, hint=self.hint).poll(block=True)

    def abandon(self, samplers: Sequence, timeout_s: float) -> None:
        """After a failed push that left learner rank 0 free: close the sender and the
        receivers of ``samplers`` (members that finished the push; the others are gone)."""
        check_timeout(timeout_s)
        if self._learner is None:
            return
        calls = {SENDER: self._learner.collective_close_sender.remote()}
        for i, sampler in enumerate(self._samplers):
            if any(sampler == k for k in samplers):
                calls[f"sampler {i}"] = sampler.collective_close_receiver.remote()
        self._learner = None
        DeadlineCalls(
            f"{self.label} teardown after a failed push", calls, timeout_s, hint=self.hint
        ).poll(block=True)

    # ------------------------------------------------------------------ state

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise WeightSyncError(f"{self.label} weight sync failed earlier ({self._failure})")

    def _fail(self, message: str) -> None:
        self._failure = message
        self._pending = None

    def _pushed(self, push: Push) -> None:
        self.version = push.version
        if self._pending is push:
            self._pending = None
