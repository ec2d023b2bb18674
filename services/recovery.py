"""How workers leave the rollout tier: a death recovered from, a drained worker retired.

A call tells of a death when it raises one (``calls.is_death``: the process died, or
``CallTimeout``) or misses its deadline (``services.calls.overdue``: a hung worker counts as
dead, as if it had crashed). Then, in this order: the worker's other calls are dropped, every
prompt group it held goes back to the front of its queue in the scheduler (its attempt counted),
the death is recorded (``Death``), and the pool retires the worker (it was draining) or restarts
it in its slot (``WorkerFailed`` once ``rollout.max_restarts`` is spent), the replacement then
started like a new worker. A call made before the worker's last restart is void (its ``gen``).
A worker drained by a resize is retired once it holds no work.

The producer (services/producer.py) owns the table of calls in flight (ref → call record of
services/calls.py); ``Recovery`` works on that same dict.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from services.calls import Call, CallTimeout, Deadlines, Death, Poll, Sample, Score, overdue
from services.pool import DRAINING, Pool, Worker
from services.scheduler import Scheduler


class Recovery:
    """Deaths and drains over the producer's calls in flight.

    tasks: the producer's dict of calls in flight (changed in place); start(pool, w): starts a
    restarted worker (the producer's ping); clock: the clock of the call records.
    """

    def __init__(
        self,
        samplers: Pool,
        scorers: Pool,
        scheduler: Scheduler,
        calls,
        tasks: dict,
        limits: Deadlines,
        start: Callable[[Pool, Worker], None],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.samplers, self.scorers, self.scheduler = samplers, scorers, scheduler
        self.calls, self.tasks, self.limits = calls, tasks, limits
        self.start, self.clock = start, clock
        self.deaths: list[Death] = []

    def check_deadlines(self) -> None:
        """A call past its deadline (services.calls.overdue) means a hung worker: it is
        treated as dead (killed, replaced, its groups handed out again), as if it had crashed.
        A hung control actor's read is dropped (the next poll asks again)."""
        if self.calls.local:  # in-process calls finish before the loop looks again
            return
        now = self.clock()
        for ref, task in list(self.tasks.items()):
            if ref not in self.tasks:  # dropped with an earlier call of the same worker
                continue
            why = overdue(task, now, self.limits)
            if why is None:
                continue
            del self.tasks[ref]
            if not isinstance(task, Poll):
                self.failed(task, CallTimeout(why))

    def failed(self, task: Call, exc: BaseException) -> None:
        """``task`` (already out of ``tasks``) raised ``exc``: a death is recovered from, any
        other error is raised again (a bug in the worker's code fails the run)."""
        w = task.worker
        if task.gen != w.restarts:
            return  # a call to a worker that has already been replaced
        if not self.calls.is_death(exc):
            raise exc
        self.lost(w, exc, task)

    def lost(self, w: Worker, exc: BaseException, task: Call | None = None) -> None:
        """``w`` is dead (``task``: the call that told us, if any): replace it, re-dispatch."""
        pool = self.samplers if self.samplers.holds(w) else self.scorers
        groups = self._reclaim(w, task)
        self.deaths.append(Death(time.perf_counter(), w.name, groups, str(exc)[-300:]))
        if w.state == DRAINING:
            pool.retire(w)
            return
        pool.restart(w, exc)  # raises WorkerFailed once the budget is spent
        self.start(pool, w)

    def sweep_drained(self) -> None:
        """Retire every draining worker that holds no sample or score call any more."""
        busy = {id(t.worker) for t in self.tasks.values() if isinstance(t, (Sample, Score))}
        for pool in (self.samplers, self.scorers):
            for w in [w for w in pool.workers if w.state == DRAINING and id(w) not in busy]:
                self.retire_if_drained(pool, w)

    def retire_if_drained(self, pool: Pool, w: Worker) -> None:
        """A draining worker (removed by a resize) that holds no groups is stopped."""
        if w.state == DRAINING and w.outstanding <= 0:
            self.drop_calls(w)
            pool.retire(w)

    def drop_calls(self, w: Worker) -> list[Call]:
        """Take every call of ``w`` out of ``tasks``; returns them (in submission order)."""
        mine = [ref for ref, t in self.tasks.items() if getattr(t, "worker", None) is w]
        return [self.tasks.pop(ref) for ref in mine]

    def _reclaim(self, w: Worker, failed: Call | None) -> int:
        """Hand back every group ``w`` holds (``failed``, the call that told us, included:
        it has already left ``tasks``); returns how many."""
        held = ([failed] if failed is not None else []) + self.drop_calls(w)
        groups = 0
        for task in held:
            if isinstance(task, Sample):
                groups += self.scheduler.requeue_chunk(task.chunk, task.received)
            elif isinstance(task, Score):
                groups += self.scheduler.requeue_groups(task.groups)
        w.redispatched += groups
        w.outstanding = 0
        return groups
