"""services/recovery.py without Ray: what a worker's death and a drain do to the calls in flight,
the scheduler's queues and the pool (the real ``Recovery``, ``Scheduler`` and ``Pool`` over a
calls backend that stands in for Ray). Missed deadlines are in test_calls_liveness.py, deaths of
real engines in test_faults.py."""

from __future__ import annotations

import itertools

import pytest

from rollout.sampler import WorkItem
from services.calls import Deadlines, Load, Sample, Score
from services.pool import DRAINING, READY, STARTING, Pool
from services.recovery import Recovery
from services.scheduler import Chunk, Group, Scheduler


class _Died(Exception):
    """Stands in for a Ray error that says the worker's process died."""


class _Calls:
    local = False

    def __init__(self) -> None:
        self.killed: list = []

    def call(self, handle, method, *args, **kwargs):
        return object()

    def kill(self, handle) -> None:
        self.killed.append(handle)

    def is_death(self, exc) -> bool:
        return isinstance(exc, _Died)


def _recovery(n: int = 1):
    calls, made, started = _Calls(), itertools.count(), []
    pools = [
        Pool(
            role,
            prefix,
            lambda name, slot: f"{name}#{next(made)}",
            ping,
            max_restarts=1,
            calls=calls,
        )
        for role, prefix, ping in (
            ("sampler", "student-sampler", "version"),
            ("scorer", "teacher-scorer", "ready"),
        )
    ]
    for pool in pools:
        pool.resize(n)
        for w in pool.workers:
            w.state = READY
    tasks: dict = {}
    recovery = Recovery(
        *pools, Scheduler(4), calls, tasks, Deadlines(), lambda pool, w: started.append(w.name)
    )
    return recovery, tasks, started, calls


def _chunk(n: int = 3) -> Chunk:
    return Chunk(step=1, first=0, items=tuple(WorkItem(f"p{i}", "1", (1, 2)) for i in range(n)))


def test_a_dead_scorer_s_groups_go_back_first_in_order_and_it_is_replaced():
    recovery, tasks, started, calls = _recovery()
    w, sampler = recovery.scorers.workers[0], recovery.samplers.workers[0]
    groups = [Group(step, (), "student-sampler-0", 1) for step in range(3)]
    recovery.scheduler.sampled(Group(9, (), "student-sampler-0", 1))  # waiting already
    tasks["other score"] = Score(w, 0, groups=groups[2:])
    tasks["a sample"] = Sample(sampler, 0, chunk=_chunk())
    old = w.handle
    recovery.failed(Score(w, 0, groups=groups[:2]), _Died("the process died"))
    unscored = [(g.step, g.attempt) for g in recovery.scheduler.unscored]
    # each call's groups go to the front in order (the failed call's, then those of the call
    # dropped with it), their attempt counted
    assert unscored == [(2, 2), (0, 2), (1, 2), (9, 1)]
    assert list(tasks) == ["a sample"]  # its other call is dropped, the sampler's stays
    assert calls.killed == [old] and w.restarts == 1 and w.state == STARTING
    assert started == ["teacher-scorer-0"]  # the replacement is started like a new worker
    death = recovery.deaths[0]
    assert (death.worker, death.groups, w.redispatched) == ("teacher-scorer-0", 3, 3)


def test_void_calls_other_errors_and_a_draining_sampler_s_death():
    recovery, tasks, started, calls = _recovery(n=2)
    recovery.samplers.resize(1)
    w = recovery.samplers.workers[1]
    assert w.state == DRAINING
    recovery.failed(Sample(w, 5, chunk=_chunk()), _Died())  # made before its last restart
    assert not recovery.deaths and not recovery.scheduler.queue
    with pytest.raises(ValueError, match="a bug"):  # not a death: the run fails
        recovery.failed(Sample(w, 0, chunk=_chunk()), ValueError("a bug in the sampler"))
    recovery.failed(Sample(w, 0, chunk=_chunk(), received={1}), _Died())
    assert recovery.samplers.removed == [w] and started == [] and w.restarts == 0  # retired
    queued = [(c.first, len(c.items), c.attempt) for c in recovery.scheduler.queue]
    assert queued == [(0, 1, 2), (2, 1, 2)]  # the positions it had not sent


def test_a_drained_worker_is_retired_once_it_holds_no_work():
    recovery, tasks, started, calls = _recovery(n=3)
    recovery.samplers.resize(1)
    busy, idle = recovery.samplers.workers[1:]
    # sent its one group, its stream not yet ended: it holds no group but still a call
    tasks["sample"] = Sample(busy, 0, chunk=_chunk(1), received={0})
    tasks["load"] = Load(idle, 0)  # a weight load is no work: it does not keep a worker
    recovery.sweep_drained()
    assert [w.name for w in recovery.samplers.workers] == ["student-sampler-0", "student-sampler-1"]
    assert list(tasks) == ["sample"] and calls.killed == [idle.handle]
    busy.outstanding = 1
    recovery.retire_if_drained(recovery.samplers, busy)
    assert len(recovery.samplers.workers) == 2  # still holds a group
    busy.outstanding = 0
    recovery.retire_if_drained(recovery.samplers, busy)  # as when its stream ends
    assert [w.name for w in recovery.samplers.removed] == ["student-sampler-2", "student-sampler-1"]
    assert tasks == {} and not recovery.deaths
