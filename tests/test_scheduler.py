"""The rollout tier's decisions (services/scheduler.py) through its public API, and the real
producer, pool and channel driven in process over test-double engines (tests/fake_engines.py).
The engine-backed fault tests are in test_faults.py."""

from __future__ import annotations

import pytest

from rollout.sampler import WorkItem


def _items(n: int) -> list[WorkItem]:
    return [WorkItem(f"p{i}", "0", (1, 2)) for i in range(n)]


def test_share_follows_measured_speed():
    from services.scheduler import share

    assert share(0.0, [0.0, 0.0], 32) == 16  # nothing measured: halves
    assert share(0.0, [30.0, 0.0], 32) == 16  # an unmeasured sampler counts as the mean
    # 32 x 30/33 = 29.1 and 32 x 3/33 = 2.9: the fastest rounds up, the others down
    assert share(30.0, [30.0, 3.0], 32) == 30 and share(3.0, [30.0, 3.0], 32) == 2
    assert share(1e-6, [30.0, 1e-6], 32) == 1  # however slow, a ready sampler takes one
    assert share(30.0, [30.0], 32) == 32  # one sampler: the whole step as one engine batch
    assert share(30.0, [30.0, 3.0], 32, fixed=5) == 5  # fixed size when configured


def test_take_chunk_cuts_shares_and_keeps_positions():
    from services.scheduler import Scheduler, chunk_seed

    sched = Scheduler(prompts_per_step=32)
    sched.open_step(1, _items(32))
    rates = [30.0, 3.0]
    fast = sched.take_chunk(30.0, rates, lambda step: True)
    slow = sched.take_chunk(3.0, rates, lambda step: True)
    assert [it.problem_id for it in fast.items] == [f"p{i}" for i in range(30)]
    assert [it.problem_id for it in slow.items] == ["p30", "p31"] and slow.first == 30
    # seeds follow the position in the step, not the chunk
    assert chunk_seed(7, slow) - chunk_seed(7, fast) == 30
    assert sched.take_chunk(3.0, rates, lambda step: True) is None and sched.queued_groups == 0


def test_take_chunk_respects_the_version_rule():
    from services.scheduler import Scheduler

    sched = Scheduler(prompts_per_step=4)
    sched.open_step(3, _items(4))
    assert sched.take_chunk(1.0, [1.0], lambda step: step < 3) is None  # too old a policy
    assert sched.queued_groups == 4
    assert sched.take_chunk(1.0, [1.0], lambda step: step <= 3).step == 3


def test_a_dead_samplers_unfinished_groups_go_back_first_in_runs():
    from services.scheduler import Scheduler, runs

    assert runs([]) == [] and runs([0, 1, 3, 4, 5, 9]) == [[0, 1], [3, 4, 5], [9]]
    sched = Scheduler(prompts_per_step=8)
    sched.open_step(1, _items(8))
    held = sched.take_chunk(1.0, [1.0, 1.0], lambda step: True)  # p0..p3
    sched.open_step(2, _items(8))
    assert sched.requeue_chunk(held, done={1, 2}) == 2
    back = list(sched.queue)[:2]
    assert [(c.first, [i.problem_id for i in c.items], c.attempt) for c in back] == [
        (0, ["p0"], 2),
        (3, ["p3"], 2),
    ]
    assert sched.queued_groups == 2 + 4 + 8


def test_waiting_groups_are_batched_per_scorer_and_a_dead_scorers_return_in_order():
    from services.scheduler import Group, Scheduler

    sched = Scheduler(prompts_per_step=4)
    for name, step in (("a", 1), ("b", 1), ("c", 2)):
        sched.sampled(Group(step, (f"{name}0", f"{name}1"), "student-sampler-0", 1))
    assert [g.rollouts[0] for g in sched.take_groups(ready_scorers=2)] == ["a0", "b0"]
    taken = sched.take_groups(ready_scorers=1)
    assert [g.rollouts[0] for g in taken] == ["c0"] and not sched.unscored
    sched.sampled(Group(3, ("d0",), "student-sampler-1", 1))
    assert sched.requeue_groups(taken) == 1
    assert [(g.rollouts[0], g.attempt) for g in sched.unscored] == [("c0", 2), ("d0", 1)]


def test_admission_waits_for_a_version_and_for_room():
    from services.scheduler import may_open

    kw = dict(live=1, admitted=True, in_flight=0, step_samples=128, capacity=64)
    assert may_open(**kw)  # an empty pipeline admits any step (no deadlock)
    assert not may_open(**(kw | {"live": 0}))
    assert not may_open(**(kw | {"admitted": False}))
    assert not may_open(**(kw | {"in_flight": 1}))  # 1 + 128 > 64
    assert may_open(**(kw | {"in_flight": 64, "capacity": 192}))


# --------------------------------------------------------------- the tier over fake engines


def _service(samplers=1, scorers=1, prompts=8, n=2, staleness=0):
    from fake_engines import FakeSpec

    from services.rollout_service import RolloutPlan, RolloutService

    plan = RolloutPlan(
        prompts_per_step=prompts,
        samples_per_prompt=n,
        max_tokens=8,
        temperature=1.0,
        max_staleness=staleness,
        channel_capacity=64,
        sync_timeout_s=30,
        seed=3,
    )
    spec = FakeSpec()
    svc = RolloutService(
        student_settings=spec,
        teacher_settings=spec,
        num_samplers=samplers,
        num_scorers=scorers,
        sampler_resources={},
        scorer_resources={},
        plan=plan,
        in_process=True,
    )
    return svc, spec


def test_next_batch_is_one_object_with_provenance_and_source_state():
    from fake_engines import FakeTeacherEngine

    from rollout.sources import make_source

    FakeTeacherEngine.calls.clear()
    svc, spec = _service(samplers=2, scorers=1)
    source, replay = make_source("arithmetic", seed=5), make_source("arithmetic", seed=5)
    svc.start(source, lambda text: [ord(c) % 50 for c in text], first_step=1, last_step=3)
    try:
        batch = svc.next_batch(1, timeout=30)
        want = [f"{p.id}/{k}" for p in replay.next_batch(8) for k in range(2)]
        assert batch.step == 1 and [s.sample_id for s in batch] == sorted(want)
        assert len(batch.provenance) == 16
        assert {p.scorer for p in batch.provenance} == {"teacher-scorer-0"}
        assert {p.sampler for p in batch.provenance} <= {"student-sampler-0", "student-sampler-1"}
        assert batch.source_state == replay.state()  # where a resume after step 1 starts
        assert sum(FakeTeacherEngine.calls) == 16  # every sample scored exactly once
        svc.push_weights([("w", 1)], version=1, wait=True)
        assert svc.sampler_versions() == [1, 1]
        second = svc.next_batch(2, timeout=30)
        assert {s.policy_version for s in second} == {1}  # strictly on-policy
        assert [e.loads for e in spec.built] == [[1], [1]]
        svc.scale(samplers=1, scorers=2)  # scorers resize like samplers; a sampler drains
        svc.push_weights([("w", 2)], version=2)  # staleness 0: step 3 waits for version 2
        third = svc.next_batch(3, timeout=30)
        assert len(third) == 16 and svc.sampler_versions() == [2]
        assert svc.worker_metrics()["rollout/num_scorers"] == 2
    finally:
        svc.stop()


def test_the_producer_refuses_an_unknown_message():
    from services import messages

    svc, _ = _service()
    try:
        with pytest.raises(TypeError, match="no handler for 'not a message'"):
            svc._channel.send("not a message").result(10)
        assert svc.sampler_versions() == [0]  # the loop is still serving
        assert all(isinstance(t, type) for t in messages.Message.__args__)
    finally:
        svc.stop()
