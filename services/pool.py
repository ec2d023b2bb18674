"""Worker pools: one per role (student samplers, teacher scorers).

A pool owns its workers' handles, their lifecycle, restarts and membership (live resize): every
change of a worker's ``state`` goes through a ``Pool`` method, along these edges::

    STARTING --started--> SYNCING --synced--> READY --resize--> DRAINING --retire--> DEAD
        (a scorer goes STARTING → READY; a dead worker goes back to STARTING by restart)

The producer asks the pool who is ready and reads each worker's load and speed; the scheduler
(services/scheduler.py) decides who gets what. Work is never pinned to a worker.

Calls go through a small backend (services/calls.py) so the same producer drives Ray actors
or plain objects in this process (the in-process mode for debugging).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.errors import UserError


class WorkerState(enum.Enum):
    STARTING = "starting"  # created (or restarted), not yet answered its first ping
    SYNCING = "syncing"  # a sampler loading the current weights before it takes work
    READY = "ready"  # takes work
    DRAINING = "draining"  # removed by a resize: finishes what it holds, takes nothing new
    DEAD = "dead"  # stopped


STARTING, SYNCING, READY, DRAINING, DEAD = WorkerState


class WorkerFailed(UserError, RuntimeError):
    """A worker kept failing after ``rollout.max_restarts`` restarts; names it and its last error."""


def short_error(exc: BaseException, limit: int = 300) -> str:
    """The last line of an error that names an exception (Ray wraps the cause in tracebacks)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "Error" in ln.split(":")[0] or "Exception" in ln.split(":")[0]]
    text = (named or lines or [type(exc).__name__])[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------ pool


@dataclass(eq=False)
class Worker:
    """One member of a pool. ``version`` (samplers) is the policy version it has loaded."""

    name: str
    slot: int
    handle: Any
    state: WorkerState = STARTING
    version: int = 0
    loading: int = 0  # highest version sent to it and not yet confirmed
    restarts: int = 0
    samples: int = 0
    redispatched: int = 0
    outstanding: int = 0  # groups it holds (sampling or scoring)
    last_error: str = ""
    started: float = field(default_factory=time.perf_counter)
    rate: float = 0.0  # prompt groups per second over its recent chunks (samplers; 0 = unknown)

    def observe_rate(self, groups_per_s: float, weight: float = 0.5) -> None:
        """Fold one finished chunk's speed into ``rate`` (exponential moving average)."""
        self.rate = (
            groups_per_s if self.rate <= 0 else (1 - weight) * self.rate + weight * groups_per_s
        )


class Pool:
    """Membership, health and restarts of one role's workers.

    make(name, slot) builds a worker handle (an actor creation returns at once; the pool then
    pings it with ``ping_method`` and the producer waits for the answer like for any call).
    """

    def __init__(
        self,
        role: str,
        prefix: str,
        make: Callable[[str, int], Any],
        ping_method: str,
        *,
        max_restarts: int,
        calls,
    ) -> None:
        self.role, self.prefix, self.make, self.ping_method = role, prefix, make, ping_method
        self.max_restarts = max_restarts
        self.calls = calls
        self.workers: list[Worker] = []
        self.target = 0
        self.removed: list[Worker] = []  # drained and stopped (kept for their counters)

    def _name(self, slot: int) -> str:
        return f"{self.prefix}-{slot}"

    def add(self) -> Worker:
        used = {w.slot for w in self.workers}
        slot = next(i for i in range(len(used) + 1) if i not in used)
        w = Worker(self._name(slot), slot, self.make(self._name(slot), slot))
        self.workers.append(w)
        return w

    def ping(self, w: Worker):
        return self.calls.call(w.handle, self.ping_method)

    def holds(self, w: Worker) -> bool:
        return any(v is w for v in self.workers)

    def started(self, w: Worker, answer) -> None:
        """``w`` answered its first ping: a sampler (``answer`` = the version it serves) goes
        on to load the current weights, a scorer is ready."""
        if w.state != STARTING:
            return
        if self.ping_method == "version":
            w.version, w.state = int(answer), SYNCING
        else:
            w.state = READY

    def synced(self, w: Worker) -> None:
        """A syncing sampler has the weights it needs: it takes work from now on."""
        if w.state == SYNCING:
            w.state = READY

    def restart(self, w: Worker, error: BaseException) -> None:
        """Replace a dead worker in its slot, or raise WorkerFailed once its budget is spent."""
        w.last_error = short_error(error)
        self.calls.kill(w.handle)
        if w.restarts >= self.max_restarts:
            w.state = DEAD
            raise WorkerFailed(
                f"{w.name} failed and was restarted {w.restarts} time(s) already "
                f"(rollout.max_restarts = {self.max_restarts}); last error: {w.last_error}"
            )
        w.restarts += 1
        w.handle = self.make(w.name, w.slot)
        w.state, w.version, w.loading, w.outstanding, w.rate = STARTING, 0, 0, 0, 0.0
        w.started = time.perf_counter()

    def retire(self, w: Worker) -> None:
        self.calls.kill(w.handle)
        w.state = DEAD
        self.workers.remove(w)
        self.removed.append(w)

    def ready(self) -> list[Worker]:
        return [w for w in self.workers if w.state == READY]

    def live(self) -> list[Worker]:
        """Workers that count for the served version (have weights, may hold work)."""
        return [w for w in self.workers if w.state in (READY, DRAINING)]

    def resize(self, n: int) -> list[Worker]:
        """Aim for ``n`` workers; returns the new ones (to be pinged). Surplus ones drain:
        they take no new work and are stopped once they hold none."""
        if n < 1:
            raise ValueError(f"a pool of {self.role}s needs at least 1 worker, asked for {n}")
        self.target = n
        active = [w for w in self.workers if w.state != DRAINING]
        new = []
        while len(active) < n:
            w = self.add()
            active.append(w)
            new.append(w)
        for w in sorted(active, key=lambda w: -w.slot)[: max(0, len(active) - n)]:
            w.state = DRAINING
        return new

    def find(self, name: str) -> Worker | None:
        """Worker ``name``, current or removed (its counters are kept)."""
        return next((w for w in self.workers + self.removed if w.name == name), None)

    def counters(self) -> dict[str, float | str]:
        """Per-worker counters (metrics.jsonl) and each current worker's state."""
        row: dict[str, float | str] = {}
        for w in self.workers + self.removed:
            row[f"worker/{w.name}/samples"] = row.get(f"worker/{w.name}/samples", 0) + w.samples
            row[f"worker/{w.name}/restarts"] = row.get(f"worker/{w.name}/restarts", 0) + w.restarts
            row[f"worker/{w.name}/redispatched_groups"] = (
                row.get(f"worker/{w.name}/redispatched_groups", 0) + w.redispatched
            )
        for w in self.workers:
            row[f"worker/{w.name}/state"] = w.state.value
            row[f"worker/{w.name}/held_groups"] = max(0, w.outstanding)
            if w.rate > 0:
                row[f"worker/{w.name}/groups_per_s"] = w.rate
        return row
