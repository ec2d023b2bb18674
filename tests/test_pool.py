"""Pool, publisher and producer logic without engines: restart budget, draining, version
arithmetic, re-dispatch bookkeeping (the engine-backed fault tests are in test_faults.py)."""

from __future__ import annotations

import pytest


class _Handle:
    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False

    def close(self) -> None:
        self.closed = True


def _pool(max_restarts: int = 2, n: int = 2):
    from services.pool import LocalCalls, Pool

    made = []

    def make(name, slot):
        made.append(name)
        return _Handle(name)

    pool = Pool(
        "sampler", "student-sampler", make, "version", max_restarts=max_restarts, calls=LocalCalls()
    )
    pool.resize(n)
    return pool, made


def test_restart_budget_then_clear_failure():
    from services.pool import STARTING, WorkerFailed

    pool, made = _pool(max_restarts=2)
    w = pool.workers[1]
    old = w.handle
    pool.restart(w, RuntimeError("engine died"))
    assert old.closed and w.handle is not old and w.state == STARTING and w.restarts == 1
    pool.restart(w, RuntimeError("again"))
    with pytest.raises(WorkerFailed) as info:
        pool.restart(w, RuntimeError("Traceback...\nRuntimeError: injected start-up fault"))
    msg = str(info.value)
    assert "student-sampler-1" in msg and "rollout.max_restarts = 2" in msg
    assert msg.endswith("last error: RuntimeError: injected start-up fault")
    assert made == ["student-sampler-0", "student-sampler-1"] + ["student-sampler-1"] * 2


def test_resize_adds_free_slots_and_drains_the_highest():
    from services.pool import DRAINING, READY

    pool, made = _pool(n=1)
    pool.workers[0].state = READY
    new = pool.resize(3)
    assert [w.name for w in new] == ["student-sampler-1", "student-sampler-2"]
    for w in new:
        w.state = READY
    pool.resize(1)
    assert [w.state for w in pool.workers] == [READY, DRAINING, DRAINING]
    pool.retire(pool.workers[2])
    pool.workers[1].samples = 5
    pool.retire(pool.workers[1])
    assert [w.name for w in pool.workers] == ["student-sampler-0"]
    assert pool.counters()["worker/student-sampler-1/samples"] == 5  # kept after removal
    assert pool.resize(2)[0].name == "student-sampler-1"  # the freed slot is reused
    with pytest.raises(ValueError, match="at least 1"):
        pool.resize(0)


def test_version_arithmetic_has_one_home():
    from services.pool import LocalCalls, Worker
    from services.publisher import Publisher, WeightSyncError, trained_at

    pub = Publisher(LocalCalls(), max_staleness=1, sync_timeout_s=10)
    assert trained_at(5) == 4 and pub.need(5) == 3
    assert pub.admits(5, 3) and not pub.admits(5, 2)
    w = Worker("student-sampler-0", 0, object(), version=2)
    assert not pub.may_take(w, 5)
    w.loading = 3  # a load queued on the actor runs before any chunk sent after it
    assert pub.may_take(w, 5)
    pub.publish("weights-v4", 4)
    with pytest.raises(WeightSyncError, match="not newer"):
        pub.publish("weights-v4-again", 4)
    strict = Publisher(LocalCalls(), max_staleness=0, sync_timeout_s=10)
    assert strict.need(1) == 0 and strict.need(7) == 6


def test_redispatch_splits_unfinished_groups_into_runs():
    from services.producer import _runs

    assert _runs([]) == []
    assert _runs([0, 1, 3, 4, 5, 9]) == [[0, 1], [3, 4, 5], [9]]


def test_short_error_keeps_the_cause_line():
    from services.pool import short_error

    exc = RuntimeError(
        "The actor died because of an error raised in its creation task\n"
        "  File x.py, line 3\n"
        "EngineError: vLLM could not start on /m: out of memory\n"
    )
    assert short_error(exc) == "EngineError: vLLM could not start on /m: out of memory"


def _producer(pool, **plan_fields):
    from services.pool import LocalCalls
    from services.producer import Producer, RolloutPlan
    from services.publisher import Publisher

    fields = dict(
        prompts_per_step=32,
        samples_per_prompt=4,
        max_tokens=8,
        temperature=1.0,
        max_staleness=1,
        channel_capacity=1024,
        sync_timeout_s=10,
        seed=0,
    )
    fields.update(plan_fields)
    calls = LocalCalls()
    publisher = Publisher(calls, max_staleness=1, sync_timeout_s=10)
    return Producer(pool, pool, publisher, channel=None, plan=RolloutPlan(**fields), calls=calls)


def test_dynamic_share_follows_measured_speed():
    from services.pool import READY

    pool, _ = _pool(n=2)
    for w in pool.workers:
        w.state = READY
    fast, slow = pool.workers
    prod = _producer(pool)
    assert prod.share(fast) == prod.share(slow) == 16  # nothing measured: halves
    fast.observe_rate(30.0)
    assert prod.share(slow) == 16  # an unmeasured sampler counts as the measured mean
    slow.observe_rate(3.0)
    # 32 x 30/33 = 29.1 and 32 x 3/33 = 2.9: the fastest rounds up, the others down
    assert (prod.share(fast), prod.share(slow)) == (30, 2)
    slow.observe_rate(1.0)  # moving average: (3 + 1) / 2
    assert slow.rate == 2.0 and prod.share(slow) == 2
    slow.rate = 1e-6  # however slow, a ready sampler still takes one group
    assert prod.share(slow) == 1
    pool.workers[1].state = "draining"  # only ready samplers share a step
    assert prod.share(fast) == 32
    assert _producer(pool, dispatch_groups=5).share(fast) == 5  # fixed size when configured


def test_dispatch_cuts_each_samplers_share_off_the_step():
    from collections import deque

    from rollout.sampler import WorkItem
    from services.pool import READY
    from services.producer import Chunk

    pool, _ = _pool(n=2)
    taken = {}
    for w in pool.workers:
        w.state = READY
        w.handle.sample_stream = lambda items, req, name=w.name: (
            taken.setdefault(name, ([it.problem_id for it in items], req.seed)) and iter(())
        )
    fast, slow = pool.workers
    fast.observe_rate(30.0)
    slow.observe_rate(3.0)
    prod = _producer(pool)
    items = [WorkItem(f"p{i}", "0", (1, 2)) for i in range(32)]
    prod.queue = deque([Chunk(step=1, first=0, items=items)])
    prod._dispatch()
    ids0, seed0 = taken["student-sampler-0"]
    ids1, seed1 = taken["student-sampler-1"]
    assert ids0 == [f"p{i}" for i in range(30)] and ids1 == ["p30", "p31"]
    assert seed1 - seed0 == 30  # seeds follow the position in the step, not the chunk
    assert not prod.queue and (fast.outstanding, slow.outstanding) == (30, 2)


def test_waiting_groups_are_scored_in_one_call_and_split_back():
    from services.pool import READY
    from services.producer import Group

    class _Channel:
        def __init__(self):
            self.times = []

        def add_times(self, **kw):
            self.times.append(kw)

    calls_made = []
    pool, _ = _pool(n=1)
    scorer = pool.workers[0]
    scorer.state = READY
    scorer.handle.score = lambda rollouts: (
        calls_made.append(list(rollouts))
        or (
            [f"scored:{r}" for r in rollouts],
            0.5,
        )
    )
    prod = _producer(pool)
    prod.channel = _Channel()
    prod.samplers = type(pool)("sampler", "s", lambda n, s: None, "v", max_restarts=0, calls=None)
    prod.unscored.extend(
        [
            Group(1, ["a0", "a1"], "student-sampler-0", 1),
            Group(1, ["b0", "b1"], "student-sampler-1", 2),
            Group(2, ["c0", "c1"], "student-sampler-0", 1),
        ]
    )
    prod._dispatch_scores()
    assert calls_made == [["a0", "a1", "b0", "b1", "c0", "c1"]]  # one teacher call
    ((ref, task),) = prod.tasks.items()
    assert scorer.outstanding == 3
    prod._dispatch_scores()  # busy scorer: nothing more is sent
    assert len(calls_made) == 1
    del prod.tasks[ref]  # as _wait does with a failed call before _failed → _reclaim
    prod._reclaim(scorer, task)  # it died holding them: all three wait again, in order
    assert [(g.step, g.rollouts[0], g.attempt) for g in prod.unscored] == [
        (1, "a0", 2),
        (1, "b0", 3),
        (2, "c0", 2),
    ]
    prod.unscored.clear()
    scorer.outstanding = 3  # now as if the call had succeeded
    prod._finished(task, prod.calls.get(ref))
    assert [(step, [s for s, _ in items]) for step, items in prod.out] == [
        (1, ["scored:a0", "scored:a1"]),
        (1, ["scored:b0", "scored:b1"]),
        (2, ["scored:c0", "scored:c1"]),
    ]
    provs = [items[0][1] for _, items in prod.out]
    assert [(p.sampler, p.attempt) for p in provs] == [
        ("student-sampler-0", 1),
        ("student-sampler-1", 2),
        ("student-sampler-0", 1),
    ]
    assert scorer.outstanding == 0 and scorer.samples == 6
    assert prod.channel.times == [{"score": 0.5, "samples": 6}]
