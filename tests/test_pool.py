"""Worker pools without engines: the lifecycle of a worker, restart budget, draining (the
scheduler's decisions are in test_scheduler.py, the engine-backed faults in test_faults.py)."""

from __future__ import annotations

import pytest


class _Handle:
    def __init__(self, name: str) -> None:
        self.name, self.closed = name, False

    def close(self) -> None:
        self.closed = True


def _pool(max_restarts: int = 2, n: int = 2):
    from services.calls import LocalCalls
    from services.pool import Pool

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


def test_every_state_change_goes_through_the_pool():
    from services.calls import LocalCalls
    from services.pool import DRAINING, READY, STARTING, SYNCING, Pool, WorkerState

    samplers = Pool(
        "sampler", "s", lambda n, s: _Handle(n), "version", max_restarts=1, calls=LocalCalls()
    )
    scorers = Pool(
        "scorer", "t", lambda n, s: _Handle(n), "ready", max_restarts=1, calls=LocalCalls()
    )
    (s,), (t,) = samplers.resize(1), scorers.resize(1)
    assert s.state is t.state is STARTING and isinstance(s.state, WorkerState)
    samplers.started(s, "4")  # a sampler answers its version and loads the current weights
    assert (s.state, s.version) == (SYNCING, 4) and samplers.ready() == []
    samplers.started(s, "9")  # a late second answer changes nothing
    assert s.version == 4
    samplers.synced(s)
    assert s.state == READY and samplers.ready() == [s]
    scorers.started(t, True)  # a scorer is ready at once
    assert t.state == READY
    samplers.resize(2)
    samplers.resize(1)
    assert [w.state for w in samplers.workers] == [READY, DRAINING]
    samplers.synced(samplers.workers[1])  # only a syncing worker becomes ready
    assert samplers.workers[1].state == DRAINING


def test_no_module_sets_a_worker_state_but_the_pool():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assign = re.compile(r"\.state\s*=[^=]|\.state\s*,.*=|setattr\([^)]*[\"']state[\"']")
    found = [
        f"{path.relative_to(root)}:{i}"
        for folder in ("services", "rollout", "learner")
        for path in sorted((root / folder).glob("*.py"))
        if path.name != "pool.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if assign.search(line)
    ]
    assert not found, f"worker state set outside services/pool.py: {found}"


def test_short_error_keeps_the_cause_line():
    from services.pool import short_error

    exc = RuntimeError(
        "The actor died because of an error raised in its creation task\n"
        "  File x.py, line 3\n"
        "EngineError: vLLM could not start on /m: out of memory\n"
    )
    assert short_error(exc) == "EngineError: vLLM could not start on /m: out of memory"
