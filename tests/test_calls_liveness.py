"""Liveness without Ray: call deadlines and what a missed one does in the producer (the real
``Producer`` and ``Pool`` over a calls backend that stands in for Ray, with an injected clock),
the step watchdog, the signal handlers, the cleanup sequence, the recorded Ray session."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future

import pytest

from rollout.sampler import WorkItem
from services.calls import Deadlines, Load, Ping, Poll, Sample, Score, overdue
from services.pool import READY, STARTING, Pool, Worker
from services.scheduler import Chunk

LIMITS = Deadlines(call_s=10.0, start_s=100.0, load_s=5.0)


def _worker(name="student-sampler-0") -> Worker:
    return Worker(name, 0, handle=object(), state=READY)


def test_overdue_per_kind_of_call():
    w = _worker()
    sample = Sample(w, 0, t0=0.0, seen=50.0, chunk=None)
    assert overdue(sample, 59.0, LIMITS) is None  # counted from its last group, not its start
    why = overdue(sample, 61.0, LIMITS)
    assert (
        why
        == "student-sampler-0 finished no prompt group in 11 s (rollout.call_timeout_s = 10): hung"
    )
    assert overdue(Score(w, 0, t0=0.0), 10.5, LIMITS).startswith("student-sampler-0 did not finish")
    assert overdue(Ping(w, 0, t0=0.0), 99.0, LIMITS) is None  # placement + engine start: longer
    assert "ray.placement_timeout_s" in overdue(Ping(w, 0, t0=0.0), 101.0, LIMITS)
    assert "rollout.sync_timeout_s" in overdue(Load(w, 0, t0=0.0), 6.0, LIMITS)
    assert overdue(Poll(t0=0.0), 11.0, LIMITS) == "control actor did not answer"
    assert overdue(Score(w, 0, t0=0.0), 1e9, Deadlines()) is None  # 0 = no deadline


class _Calls:
    """Stands in for Ray under the producer: calls return tokens, nothing ever finishes."""

    local = False

    def __init__(self) -> None:
        self.killed: list = []
        self.sent: list = []

    def call(self, handle, method, *args, **kwargs):
        ref = object()
        self.sent.append((handle, method))
        return ref

    def wait(self, waitables, timeout):
        return []

    def kill(self, handle) -> None:
        self.killed.append(handle)

    def put(self, value):
        return value

    def is_death(self, exc) -> bool:
        from services.calls import CallTimeout

        return isinstance(exc, CallTimeout)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _producer(samplers=1, restarts=1):
    from services.channel import Channel
    from services.producer import Producer
    from services.rollout_service import RolloutPlan
    from services.versions import Versions

    calls, clock = _Calls(), _Clock()
    made = itertools.count()
    plan = RolloutPlan(
        prompts_per_step=4,
        samples_per_prompt=1,
        max_tokens=8,
        temperature=1.0,
        max_staleness=0,
        channel_capacity=64,
        sync_timeout_s=5.0,
        seed=0,
        max_restarts=restarts,
        call_timeout_s=10.0,
        start_timeout_s=100.0,
    )
    pools = [
        Pool(
            role,
            role,
            lambda name, slot: f"{name}#{next(made)}",
            ping,
            max_restarts=restarts,
            calls=calls,
        )
        for role, ping in (("sampler", "version"), ("scorer", "ready"))
    ]
    for pool in pools:
        pool.resize(samplers)
        for w in pool.workers:
            w.state = READY
    versions = Versions(calls, max_staleness=0, sync_timeout_s=5.0)
    producer = Producer(*pools, versions, Channel(64), plan, calls, clock=clock)
    return producer, calls, clock


def test_a_hung_sampler_is_killed_replaced_and_its_groups_handed_out_again():
    producer, calls, clock = _producer()
    w = producer.samplers.workers[0]
    old = w.handle
    items = tuple(WorkItem(f"p{i}", "1", (1, 2)) for i in range(4))
    chunk = Chunk(step=1, first=0, items=items)
    producer.tasks[object()] = Sample(w, w.restarts, t0=0.0, seen=0.0, chunk=chunk, received={0})
    w.outstanding = 3
    clock.now = 9.0
    producer.recovery.check_deadlines()
    assert w.restarts == 0 and len(producer.tasks) == 1  # within its deadline
    clock.now = 10.5
    producer.recovery.check_deadlines()
    assert calls.killed == [old]  # the hung process is killed (ray.kill) ...
    assert w.restarts == 1 and w.state == STARTING and w.handle != old  # ... and replaced
    assert [c.first for c in producer.scheduler.queue] == [1]  # groups 1-3 handed out again
    assert producer.scheduler.queued_groups == 3 and w.redispatched == 3
    assert [type(t) for t in producer.tasks.values()] == [Ping]  # the replacement is pinged
    assert "rollout.call_timeout_s" in producer.deaths[0].error
    # the replacement never starts: after ray.placement_timeout_s it is replaced in turn, and
    # once rollout.max_restarts is spent the run stops with the worker's name
    from services.pool import WorkerFailed

    clock.now = 10.5 + 101
    with pytest.raises(WorkerFailed, match=r"sampler-0 failed .* did not start in 101 s"):
        producer.recovery.check_deadlines()


def test_a_pending_replacement_does_not_block_weight_waits_forever():
    from services import messages as m
    from services.channel import Command

    producer, calls, clock = _producer(samplers=2)
    ready, starting = producer.samplers.workers
    producer.versions.publish(object(), 1)
    ready.version = 1
    starting.state = STARTING  # a replacement that Ray has not placed yet
    reply: Future = Future()
    producer.handle(Command(m.WaitPush(), reply))
    producer.waits.check(producer.samplers, producer.versions, clock.now)
    assert not reply.done()  # a replacement about to join is waited for ...
    clock.now = 100.5
    producer.waits.check(producer.samplers, producer.versions, clock.now)
    assert reply.done() and reply.result() is None  # ... but not past a start's deadline


def test_step_watchdog_names_the_step_and_what_is_missing():
    from services.channel import Channel, StepTimeout

    ch = Channel(8)
    ch.set_stats({"rollout/calls_in_flight": 2, "worker/student-sampler-0/state": "ready"})
    t0 = time.monotonic()
    with pytest.raises(StepTimeout) as info:
        ch.take(7, 4, timeout=0.2)
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert "rollout.step_timeout_s" in msg and "step 7: 0 of 4 arrived" in msg
    assert "'rollout/calls_in_flight': 2" in msg


def test_sigterm_and_sighup_take_ctrl_c_s_path():
    from services.cluster import stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with pytest.raises(KeyboardInterrupt, match=sig.name), stop_on_signals():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler interrupts this
    with stop_on_signals():  # only the first signal interrupts: cleanup can finish
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        os.kill(os.getpid(), signal.SIGTERM)  # ignored (a note on stderr)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) == before  # restored afterwards


def test_driver_stop_reasons_for_signals_and_a_hung_learner():
    from services.calls import LearnerTimeout
    from services.driver import stop_reason

    assert stop_reason(KeyboardInterrupt("SIGTERM")) == "interrupted (SIGTERM)"
    reason = stop_reason(LearnerTimeout("learner-rank-1 did not answer within 5 s"))
    assert reason == "a learner rank hung: learner-rank-1 did not answer within 5 s"


def test_stops_runs_every_stop_even_when_one_raises():
    from services.cluster import Stops

    done, notes = [], []

    class Part:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def stop(self):
            done.append(self.name)
            if self.fail:
                raise RuntimeError(f"{self.name} would not stop")

    with pytest.raises(ValueError, match="start-up failed"), Stops(report=notes.append) as stops:
        stops.add("the learner", Part("learner"), "stop")
        stops.add("the rollout tier", Part("rollout", fail=True), "stop")
        stops.add("the metrics", Part("metrics"), "stop")
        raise ValueError("start-up failed")  # the run's own error is the one raised
    assert done == ["metrics", "rollout", "learner"]  # last started first, all of them
    assert notes == [
        "[opdplus] warning: stopping the rollout tier failed: RuntimeError('rollout would not stop')"
    ]


class _Part:
    def __init__(self, name, done):
        self.name, self.done = name, done

    def stop(self):
        self.done.append(self.name)


def test_start_beside_overlaps_the_two_starts_and_keeps_the_stop_order():
    from services.cluster import Stops

    done, engines_up = [], threading.Event()

    def start_learner():  # finishes only once the main thread's start is under way
        assert engines_up.wait(30), "start_beside ran the start in the caller's thread"
        return _Part("learner", done)

    with Stops(report=done.append) as stops:
        learner_started = stops.start_beside("the learner", start_learner, "stop")
        engines_up.set()
        stops.add("the rollout tier", _Part("rollout", done), "stop")
        assert learner_started().name == "learner"
        stops.add("the metrics", _Part("metrics", done), "stop")
    assert done == ["metrics", "rollout", "learner"]  # last started first, as with add()


def test_start_beside_raises_the_background_error_and_still_stops_the_rest():
    from services.cluster import Stops

    done = []

    def start_learner():
        raise RuntimeError("learner-rank-0 could not be placed")

    with (
        pytest.raises(RuntimeError, match="learner-rank-0 could not be placed"),
        Stops(report=done.append) as stops,
    ):
        learner_started = stops.start_beside("the learner", start_learner, "stop")
        stops.add("the rollout tier", _Part("rollout", done), "stop")
        learner_started()
    assert done == ["rollout"]


def test_a_start_still_running_when_the_block_fails_is_waited_for_then_left():
    from services.cluster import Stops

    notes, release = [], threading.Event()

    def start_learner():
        release.wait(30)
        return _Part("learner", notes)

    with pytest.raises(ValueError, match="engines failed"), Stops(report=notes.append) as stops:
        stops.start_beside("the learner ranks", start_learner, "stop", wait_s=0.2)
        raise ValueError("engines failed")
    release.set()
    assert notes == ["[opdplus] warning: the learner ranks still starting; they end with Ray"]


def test_a_local_ray_an_earlier_driver_left_running_is_named(tmp_path):
    from services.cluster import SESSION_RECORD, old_session_alive

    with socket.socket() as gcs:  # stands in for the left-over instance's GCS port
        gcs.bind(("127.0.0.1", 0))
        gcs.listen()
        port = gcs.getsockname()[1]
        record = {
            "address": f"127.0.0.1:{port}",
            "session_dir": "/tmp/ray/session_x",
            "local": True,
            "driver_pid": 4242,
            "host": socket.gethostname(),
        }
        (tmp_path / SESSION_RECORD).write_text(json.dumps(record))
        assert old_session_alive(tmp_path)["session_dir"] == "/tmp/ray/session_x"
        (tmp_path / SESSION_RECORD).write_text(json.dumps(record | {"stopped_at": 1.0}))
        assert old_session_alive(tmp_path) is None  # stopped cleanly
        (tmp_path / SESSION_RECORD).write_text(json.dumps(record | {"local": False}))
        assert old_session_alive(tmp_path) is None  # a cluster is meant to outlive the run
    (tmp_path / SESSION_RECORD).write_text(json.dumps(record))
    assert old_session_alive(tmp_path) is None  # nothing answers there any more


def test_a_dead_cluster_address_is_an_error_in_seconds(tmp_path):
    from services.cluster import ClusterUnreachable, check_reachable
    from services.control import ScaleError, scale

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(
        ClusterUnreachable, match=f"nothing answers at '127.0.0.1:{port}' within 2 s"
    ):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    import ray

    if ray.is_initialized():  # scale would use this session instead of connecting
        return
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(f'[ray]\naddress = "127.0.0.1:{port}"\n')
    with pytest.raises(ScaleError, match="no Ray cluster to find the job"):
        scale(run_dir, samplers=2, scorers=None, connect_timeout_s=2)
    assert time.monotonic() - t0 < 15


def test_every_learner_call_has_a_deadline():
    """learner.step_timeout_s covers every call the driver makes on the learner ranks (build,
    step, export, checkpoint save/load, HF save, uploads), not only the step: each goes
    through ``_get_all`` with a ``timeout_s``, and nothing else in the module waits on a rank."""
    import ast

    from tests.run_helpers import REPO

    path = REPO / "services/learner_group.py"
    tree = ast.parse(path.read_text())
    waits, bare = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        if name == "_get_all":
            waits.append(node.lineno)
            if not any(k.arg == "timeout_s" for k in node.keywords):
                bare.append(f"{path.name}:{node.lineno}: _get_all without timeout_s")
        elif name in ("ray.get", "ray.wait"):
            inside = next(
                f.name
                for f in ast.walk(tree)
                if isinstance(f, ast.FunctionDef) and f.lineno <= node.lineno <= f.end_lineno
            )
            if inside != "_get_all":
                bare.append(f"{path.name}:{node.lineno}: {name} outside _get_all")
    assert waits and not bare, bare
