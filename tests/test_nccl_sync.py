"""Collective weight sync: vLLM's weight-transfer engine driven by services.nccl_sync, over NCCL
(GPUs) or gloo (CPU) — the same code with the communicator swapped.

* Real groups, parametrized by backend: a real StudentEngine receives a packed broadcast from a
  sender actor and then matches transformers on the new weights; a sender whose peer never
  receives, or never joins, fails with a clear error instead of hanging. With "gloo" these
  run on CPU in CI; with "nccl" they need CUDA (two GPUs for a push: NCCL allows one rank per
  device) and skip without it.
* CPU: argument checks, the vLLM wire-format pieces that need no device, and the control
  plane's timeout / error plumbing with small fake Ray actors (the fakes only answer the
  actor protocol, slowly or with errors).
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from engine_checks import worst_vs_transformers

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and NCCL")
# NCCL refuses two ranks on one device ("Duplicate GPU detected"), so sender and engine need two.
two_gpus = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.device_count() < 2,
    reason="needs two CUDA GPUs: NCCL allows one rank per device",
)
# Each real-group test runs with both backends: gloo on CPU here, NCCL where GPUs are.
NCCL_TWO_GPUS = pytest.param("nccl", marks=[pytest.mark.gpu, two_gpus])
NCCL_ONE_GPU = pytest.param("nccl", marks=[pytest.mark.gpu, gpu])
# The deadline the timeout tests wait out; NCCL's communicator set-up on a GPU takes longer.
DEADLINE_S = {"nccl": 15, "gloo": 5}


# ================================================================================== GPU tests


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """LlamaConfig(vocab 64, hidden 64, ffn 128, 2 layers, 2 heads) + the project's char tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.toy import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _hf_sender_actor():
    """Stands in for LearnerRank (DeepSpeed is not under test): an HF model (on this actor's GPU
    when there is one) with the learner-side collective methods, written as LearnerRank has them."""
    import ray

    @ray.remote
    class HFLearner:
        def __init__(self, model_dir: str) -> None:
            from transformers import AutoModelForCausalLM

            device = "cuda" if torch.cuda.is_available() else "cpu"
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            self.model = model.to(device)
            self.sender = None

        def perturb(self, scale: float, seed: int) -> None:
            g = torch.Generator(device=self.model.device).manual_seed(seed)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(scale * torch.randn(p.shape, generator=g, device=p.device))

        def cpu_weights(self) -> dict[str, torch.Tensor]:
            return {n: p.detach().cpu() for n, p in self.model.named_parameters()}

        def collective_sender_address(self) -> tuple[str, int]:
            from services.cluster import free_node_address

            return free_node_address()

        def collective_init_sender(
            self, master_address, master_port, world_size, dtype, backend
        ) -> None:
            from rollout.weight_transfer import WeightSender

            self.sender = WeightSender(
                master_address, master_port, world_size, backend=backend, dtype=dtype
            )

        def collective_stage_weights(self, is_sender: bool):
            # LearnerRank exports CPU copies through DeepSpeed; live CUDA parameters also work.
            weights = [(n, p.detach()) for n, p in self.model.named_parameters()]
            return self.sender.stage(weights) if is_sender else None

        def collective_send_weights(self) -> float:
            return self.sender.send_staged()

        def collective_close_sender(self) -> None:
            self.sender.close()

    return HFLearner


def _settings(model_dir, dtype: str, backend: str):
    from rollout.engine import EngineSettings

    return EngineSettings(
        model_path=str(model_dir),
        dtype=dtype,
        seed=0,
        kv_cache_mb=64,
        kv_cache_fraction=0.2,
        max_model_len=128,
        weight_transfer=backend,
    )


def _resources(backend: str) -> dict:
    return {"num_cpus": 0.5, "num_gpus": 1} if backend == "nccl" else {"num_cpus": 0}


PROMPTS = [[1, 4, 5, 6, 7], [1, 9, 8], [1, 12, 13, 14, 15, 16, 17], [1, 18, 19, 10, 11]]


def _hf_logps(model_dir, weights, dtype: str, prompts, gens) -> list[torch.Tensor]:
    """log π(y_t | x, y_<t) from transformers for every generated token, weights optional."""
    from transformers import AutoModelForCausalLM

    from models.checks import tokenizer_length
    from rollout.alignment import response_positions, token_logprobs

    device = "cuda" if HAS_CUDA else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
    out, vocab = [], tokenizer_length(model_dir)
    for prompt, (gen,) in zip(prompts, gens, strict=True):
        ids = torch.tensor([prompt + list(gen.token_ids)], device=device)
        with torch.no_grad():
            # over the tokenizer's ids, as the engine (docs/math.md §6: padding rows)
            logp = token_logprobs(model(ids).logits[..., :vocab], ids)[0].cpu()
        out.append(logp[response_positions(len(prompt), len(gen.token_ids))])
    return out


def _worst(ref: list[torch.Tensor], gens) -> float:
    return max(
        (r - torch.tensor(g.logprobs)).abs().max().item() for r, (g,) in zip(ref, gens, strict=True)
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backend", "dtype", "tol"),
    [
        ("gloo", "float32", 1e-4),
        pytest.param("nccl", "float32", 1e-4, marks=[pytest.mark.gpu, two_gpus]),
        pytest.param("nccl", "bfloat16", 1e-3, marks=[pytest.mark.gpu, two_gpus]),
    ],
)
def test_push_matches_transformers(ray_local, tiny_llama, backend, dtype, tol):
    import ray

    from services.actors import StudentSampler
    from services.nccl_sync import WeightSync

    sampler = StudentSampler.options(**_resources(backend)).remote(
        _settings(tiny_llama, dtype, backend)
    )
    learner = _hf_sender_actor().options(**_resources(backend)).remote(str(tiny_llama))
    try:
        sync = WeightSync(backend)
        sync.setup(learner, [sampler], timeout_s=300, wire_dtype=dtype)
        ray.get(learner.perturb.remote(0.05, seed=1))
        report = sync.push(1, timeout_s=120)
        assert report.sampler_versions == (1,)
        assert ray.get(sampler.version.remote()) == 1 and sync.version == 1
        gens = ray.get(sampler.generate.remote(PROMPTS, max_tokens=12, temperature=1.0, seed=0))
        new = ray.get(learner.cpu_weights.remote())
        worst_new = _worst(_hf_logps(tiny_llama, new, dtype, PROMPTS, gens), gens)
        worst_old = _worst(_hf_logps(tiny_llama, None, dtype, PROMPTS, gens), gens)
        assert worst_new < tol, f"engine vs transformers on the pushed weights: {worst_new}"
        assert worst_old > 10 * tol, "the push did not change what the engine serves"
        with pytest.raises(ValueError, match="not newer"):
            sync.start_push(1, timeout_s=10)
        # A second push goes through the same group.
        ray.get(learner.perturb.remote(0.05, seed=2))
        assert sync.push(2, timeout_s=120).sampler_versions == (2,)
        sync.close(timeout_s=60)
    finally:
        ray.kill(sampler)
        ray.kill(learner)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", NCCL_TWO_GPUS])
def test_push_without_receiver_times_out(ray_local, tiny_llama, backend):
    import ray

    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    @ray.remote
    class DeafSampler:
        """Joins the group for real, then answers pushes without receiving."""

        def __init__(self, settings) -> None:
            from rollout.engine import StudentEngine

            self.engine = StudentEngine(settings)

        def collective_init_receiver(self, master_address, master_port, rank_offset, world_size):
            from rollout.weight_transfer import WeightReceiver

            self.receiver = WeightReceiver(
                self.engine, master_address, master_port, rank_offset, world_size
            )

        def collective_receive_weights(self, meta, version):
            self.engine.version = version
            return version, 0.0

    sampler = DeafSampler.options(**_resources(backend)).remote(
        _settings(tiny_llama, "float32", backend)
    )
    learner = _hf_sender_actor().options(**_resources(backend)).remote(str(tiny_llama))
    try:
        sync = WeightSync(backend)
        sync.setup(learner, [sampler], timeout_s=300)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as err:
            sync.push(1, timeout_s=DEADLINE_S[backend])
        assert time.monotonic() - t0 < 3 * DEADLINE_S[backend]
        message = str(err.value)
        assert "still waiting on learner rank 0 (sender)" in message
        assert "sampler 0" in message.split("finished:")[1]
        with pytest.raises(WeightSyncError, match="failed earlier"):
            sync.push(2, timeout_s=15)
    finally:
        ray.kill(sampler)
        ray.kill(learner)  # blocked inside the broadcast: only killing ends it (NCCL)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gloo", NCCL_ONE_GPU])
def test_setup_without_receiver_times_out(ray_local, tiny_llama, backend):
    """One GPU is enough: the real sender waits at the rendezvous for a sampler that never joins."""
    import ray

    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    learner = _hf_sender_actor().options(**_resources(backend)).remote(str(tiny_llama))
    sampler = _fake_sampler().remote()  # returns from init without joining
    try:
        # Started before the clock runs: the deadline under test is the rendezvous's.
        ray.get([learner.perturb.remote(0.0, seed=0), sampler.calls.remote()])
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError) as err:
            WeightSync(backend).setup(learner, [sampler], timeout_s=DEADLINE_S[backend])
        assert time.monotonic() - t0 < 3 * DEADLINE_S[backend]
        assert "still waiting on learner rank 0 (sender) (finished: sampler 0)" in str(err.value)
    finally:
        ray.kill(learner)
        ray.kill(sampler)


# ========================================================================== CPU: engine pieces


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU machine the answer depends on libnccl")
def test_nccl_is_not_available_without_a_gpu():
    from rollout.weight_transfer import gloo_available, nccl_available

    assert nccl_available() is False
    assert gloo_available() is True


def test_weight_transfer_setting_is_checked_before_vllm_starts(tmp_path):
    from rollout.engine import EngineError, EngineSettings, StudentEngine, _weight_transfer_kwargs

    assert _weight_transfer_kwargs("none") == {}
    with pytest.raises(EngineError, match="weight_transfer must be one of"):
        _weight_transfer_kwargs("ipc")
    if HAS_CUDA:
        return
    (tmp_path / "config.json").write_text("{}")
    t0 = time.monotonic()
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        StudentEngine(
            EngineSettings(model_path=str(tmp_path), kv_cache_mb=16, weight_transfer="nccl")
        )
    assert time.monotonic() - t0 < 5  # refused before vLLM starts an engine


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("", 29500, 2), {}, "master_address"),
        (("127.0.0.1", 0, 2), {}, "master_port"),
        (("127.0.0.1", 70000, 2), {}, "master_port"),
        (("127.0.0.1", 29500, 1), {}, "world_size"),
        (("127.0.0.1", 29500, 2), {"dtype": "int8"}, "wire dtype"),
        (("127.0.0.1", 29500, 2), {"backend": "ipc"}, "backend must be one of"),
    ],
)
def test_sender_rejects_bad_arguments(args, kwargs, match):
    from rollout.engine import EngineError
    from rollout.weight_transfer import WeightSender

    with pytest.raises(EngineError, match=match):
        WeightSender(*args, **kwargs)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal")
def test_sender_refuses_on_cpu():
    from rollout.engine import EngineError
    from rollout.weight_transfer import WeightSender

    with pytest.raises(EngineError, match="nccl weight sender needs a CUDA GPU"):
        WeightSender("127.0.0.1", 29500, 2, backend="nccl", dtype="bfloat16")


def test_weight_meta_is_checked():
    from rollout.engine import EngineError
    from rollout.weight_transfer import WeightMeta

    meta = WeightMeta(("a", "b"), ("float32", "bfloat16"), ((2, 3), (4,)))
    assert meta.num_bytes == 2 * 3 * 4 + 4 * 2
    with pytest.raises(EngineError, match="at least one"):
        WeightMeta((), (), ())
    with pytest.raises(EngineError, match="lengths differ"):
        WeightMeta(("a",), ("float32", "float32"), ((1,),))
    with pytest.raises(EngineError, match="repeats"):
        WeightMeta(("a", "a"), ("float32", "float32"), ((1,), (1,)))
    with pytest.raises(EngineError, match="unsupported wire dtypes"):
        WeightMeta(("a",), ("int8",), ((1,),))


def test_staged_weights_agree_with_vllms_sender_check():
    """What the receivers are told (WeightMeta) must match what vLLM's sender streams."""
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLTrainerWeightTransferEngine,
        NCCLWeightTransferUpdateInfo,
    )

    from rollout.engine import EngineError
    from rollout.weight_transfer import _StagedWeights

    staged = _StagedWeights(torch.device("cpu"), torch.bfloat16)
    assert not staged
    named = [("model.embed_tokens.weight", torch.randn(8, 4)), ("model.norm.weight", torch.ones(4))]
    meta = staged.stage(named)
    assert meta.names == ("model.embed_tokens.weight", "model.norm.weight")
    assert meta.dtype_names == ("bfloat16", "bfloat16") and meta.shapes == ((8, 4), (4,))
    # vLLM's own check of iteration against metadata (the sender runs it before every send).
    sent = list(NCCLTrainerWeightTransferEngine._checked_iter(staged, staged.metadata()))
    assert [n for n, _ in sent] == list(meta.names)
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for _, t in sent)
    torch.testing.assert_close(sent[0][1], named[0][1].to(torch.bfloat16))
    # The worker-side update info accepts the metadata as the receiver passes it.
    NCCLWeightTransferUpdateInfo(
        names=list(meta.names),
        dtype_names=list(meta.dtype_names),
        shapes=[list(s) for s in meta.shapes],
    )
    staged.clear()
    assert not staged
    with pytest.raises(EngineError, match="not a tensor"):
        staged.stage([("w", [1.0, 2.0])])
    with pytest.raises(EngineError, match="non-float"):
        staged.stage([("w", torch.ones(2, dtype=torch.int64))])


def test_worker_init_payload_matches_vllms_trainer_payload():
    from vllm.distributed.weight_transfer.nccl_common import (
        NCCLWeightTransferInitInfo,
        worker_init_payload,
    )

    from rollout.weight_transfer import PACKED, nccl_worker_init_payload

    payload = nccl_worker_init_payload("10.0.0.1", 29511, 3, 4)
    info = NCCLWeightTransferInitInfo(**payload)  # what the worker parses it into
    assert (info.master_address, info.master_port, info.rank_offset, info.world_size) == (
        "10.0.0.1",
        29511,
        3,
        4,
    )
    assert info.packed is PACKED and "nccl_unique_id_b64" not in payload
    # Same wire parameters as vLLM's trainer engine defaults (what it would send, rank_offset 1).
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    trainer = NCCLTrainerInitInfo(
        master_address="10.0.0.1", master_port=29511, world_size=4, rank=0
    )
    vllm_payload = worker_init_payload(
        NCCLWeightTransferInitInfo(
            master_address=trainer.master_address,
            master_port=trainer.master_port,
            rank_offset=1,
            world_size=trainer.world_size,
            packed=trainer.packed,
            packed_buffer_size_bytes=trainer.packed_buffer_size_bytes,
            packed_num_buffers=trainer.packed_num_buffers,
        )
    )
    assert nccl_worker_init_payload("10.0.0.1", 29511, 1, 4) == vllm_payload


@pytest.fixture(scope="module")
def cpu_nccl_engine(tiny_model):
    """A real CPU StudentEngine built with weight_transfer='nccl' (the GPU-only guard bypassed):
    vLLM's worker then holds its NCCL weight-transfer engine, whose group cannot form on CPU."""
    import dataclasses

    import rollout.engine as engine_mod

    nccl = engine_mod.COLLECTIVE_BACKENDS["nccl"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(
            engine_mod.COLLECTIVE_BACKENDS,
            "nccl",
            dataclasses.replace(nccl, available=lambda: True),
        )
        engine = engine_mod.StudentEngine(
            engine_mod.EngineSettings(
                model_path=str(tiny_model),
                dtype="float32",
                seed=0,
                kv_cache_mb=64,
                weight_transfer="nccl",
            )
        )
    yield engine
    engine.close()


def _load_like_nccl_engine(worker, named):
    """What vLLM's NCCLWeightTransferEngine.receive_weights does with each received chunk."""
    worker.weight_transfer_engine.model.load_weights(named)


@pytest.mark.slow
@pytest.mark.skipif(
    HAS_CUDA, reason="passes a callable to collective_rpc: in-process CPU engine only"
)
def test_receive_lifecycle_loads_hf_names_on_cpu(cpu_nccl_engine, tiny_model):
    """The receive path minus the broadcast: start_weight_update, chunks through the worker's
    NCCL engine's load_weights (layerwise reload), finish_weight_update — then the engine
    matches transformers on the new weights. The NCCL broadcast itself is GPU-only."""
    from transformers import AutoModelForCausalLM

    from rollout.weight_transfer import _StagedWeights

    engine = cpu_nccl_engine
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    staged = _StagedWeights(torch.device("cpu"), torch.float32)
    staged.stage([(n, p.detach().clone()) for n, p in hf.named_parameters()])
    chunks = list(staged)
    llm = engine.llm
    llm.start_weight_update()
    llm.collective_rpc(_load_like_nccl_engine, args=(chunks[: len(chunks) // 2],))
    llm.collective_rpc(_load_like_nccl_engine, args=(chunks[len(chunks) // 2 :],))
    llm.finish_weight_update(weight_version="1")
    assert llm.get_weight_version() == "1"
    worst = worst_vs_transformers(engine, hf)
    assert worst < 1e-4, f"engine vs transformers after the layerwise reload: {worst}"


@pytest.mark.slow
@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU refusal")
def test_receiver_checks_before_joining(cpu_nccl_engine):
    import dataclasses

    from rollout.engine import EngineError
    from rollout.weight_transfer import WeightReceiver

    engine = cpu_nccl_engine
    with pytest.raises(EngineError, match="rank_offset must be in 1..2"):
        WeightReceiver(engine, "127.0.0.1", 29500, 0, 3)
    with pytest.raises(EngineError, match="master_port"):
        WeightReceiver(engine, "127.0.0.1", -1, 1, 3)
    built_with = engine.settings
    engine.settings = dataclasses.replace(built_with, weight_transfer="none")
    try:
        with pytest.raises(EngineError, match="collective pushes need one of"):
            WeightReceiver(engine, "127.0.0.1", 29500, 1, 2)
    finally:
        engine.settings = built_with


# ======================================================================= CPU: driver choice


@pytest.mark.parametrize(
    ("requested", "sampler_gpus", "learner_gpus", "expected"),
    [
        ("auto", 0.0, 0.0, "object_store"),
        ("auto", 1.0, 1.0, "nccl"),
        ("auto", 0.5, 1.0, "object_store"),
        ("auto", 1.0, 0.0, "object_store"),
        ("object_store", 1.0, 1.0, "object_store"),
        ("nccl", 1.0, 2.0, "nccl"),
        ("gloo", 0.0, 0.0, "gloo"),
        ("gloo", 1.0, 1.0, "gloo"),
    ],
)
def test_resolve_sync_backend(requested, sampler_gpus, learner_gpus, expected):
    from services.nccl_sync import resolve_sync_backend

    assert (
        resolve_sync_backend(requested, sampler_gpus=sampler_gpus, learner_gpus=learner_gpus)
        == expected
    )


def test_resolve_sync_backend_refuses_what_nccl_cannot_do():
    from services.nccl_sync import resolve_sync_backend

    with pytest.raises(ValueError, match="two ranks on one device"):
        resolve_sync_backend("nccl", sampler_gpus=0.5, learner_gpus=1.0)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_sync_backend("ipc", sampler_gpus=1.0, learner_gpus=1.0)


# ================================================================= CPU: control-plane plumbing


@functools.cache
def _fake_learner():
    import ray

    @ray.remote(num_cpus=0)
    class FakeLearner:
        """Answers the learner-side protocol on CPU; delays and errors are configurable."""

        def __init__(self, init_s=0.0, send_s=0.0, stage_error=None) -> None:
            self.init_s, self.send_s, self.stage_error = init_s, send_s, stage_error
            self.log = []

        def collective_sender_address(self):
            return "127.0.0.1", 29999

        def collective_init_sender(self, master_address, master_port, world_size, dtype, backend):
            time.sleep(self.init_s)
            self.log.append(("init", master_address, master_port, world_size, dtype, backend))

        def collective_stage_weights(self, is_sender):
            if self.stage_error:
                raise RuntimeError(self.stage_error)
            self.log.append(("stage", is_sender))
            return {"meta": "from-rank-0"} if is_sender else None

        def collective_send_weights(self):
            time.sleep(self.send_s)
            self.log.append(("send",))
            return 0.5

        def collective_close_sender(self):
            self.log.append(("close",))

        def calls(self):
            return self.log

    return FakeLearner


@functools.cache
def _fake_sampler():
    import ray

    @ray.remote(num_cpus=0)
    class FakeSampler:
        """Answers the sampler-side protocol on CPU; delays, errors and lies are configurable."""

        def __init__(
            self,
            init_s=0.0,
            receive_s=0.0,
            receive_error=None,
            report_version=None,
            receive_exits=False,
            close_exits=False,
        ) -> None:
            self.init_s, self.receive_s = init_s, receive_s
            self.receive_error, self.report_version = receive_error, report_version
            self.receive_exits, self.close_exits = receive_exits, close_exits
            self.log = []

        def version(self):
            return 0

        def collective_init_receiver(self, master_address, master_port, rank_offset, world_size):
            time.sleep(self.init_s)
            self.log.append(("init", master_address, master_port, rank_offset, world_size))

        def collective_receive_weights(self, meta, version, repeat=False):
            if self.receive_exits:
                import os

                os._exit(1)  # the actor dies in the push
            time.sleep(self.receive_s)
            if self.receive_error:
                raise RuntimeError(self.receive_error)
            self.log.append(
                ("receive", meta, version, "repeat") if repeat else ("receive", meta, version)
            )
            return (self.report_version or version), 0.25

        def collective_close_receiver(self):
            if self.close_exits:
                import os

                os._exit(1)  # the actor dies as its group closes
            self.log.append(("close",))

        def calls(self):
            return self.log

    return FakeSampler


@pytest.fixture
def kill_after(ray_local):
    actors = []
    yield actors.append
    for a in actors:
        ray_local.kill(a)


def _make(kill_after, learner_kwargs=None, sampler_kwargs=()):
    import ray

    learner = _fake_learner().remote(**(learner_kwargs or {}))
    samplers = [_fake_sampler().remote(**kw) for kw in sampler_kwargs]
    for a in [learner, *samplers]:
        kill_after(a)
    # Started before the clock runs: the timeouts under test are about the protocol calls.
    ray.get([a.calls.remote() for a in [learner, *samplers]])
    return learner, samplers


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_setup_and_push_plumbing(ray_local, kill_after, backend):
    from services.nccl_sync import WeightSync

    learner, samplers = _make(kill_after, sampler_kwargs=[{}, {}])
    peer = _fake_learner().remote()
    kill_after(peer)
    sync = WeightSync(backend)
    sync.setup(learner, samplers, timeout_s=30, wire_dtype="bfloat16", learner_peers=[peer])
    assert sync.ready and sync.address == ("127.0.0.1", 29999)
    report = sync.push(1, timeout_s=30)
    assert report.version == 1 and report.sampler_versions == (1, 1) and sync.version == 1
    assert report.send_s == 0.5 and report.receive_s == (0.25, 0.25)
    push = sync.start_push(2, timeout_s=30)
    deadline = time.monotonic() + 30
    while push.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sync.version == 2
    sync.close(timeout_s=30)

    assert ray_local.get(learner.calls.remote()) == [
        ("init", "127.0.0.1", 29999, 3, "bfloat16", backend),
        ("stage", True),
        ("send",),
        ("stage", True),
        ("send",),
        ("close",),
    ]
    assert ray_local.get(peer.calls.remote()) == [("stage", False), ("stage", False)]
    for rank, sampler in enumerate(samplers, start=1):
        assert ray_local.get(sampler.calls.remote()) == [
            ("init", "127.0.0.1", 29999, rank, 3),
            # rank 0's export result reaches every sampler without passing through the driver
            ("receive", {"meta": "from-rank-0"}, 1),
            ("receive", {"meta": "from-rank-0"}, 2),
            ("close",),
        ]


@pytest.mark.slow
def test_setup_timeout_names_the_side_that_did_not_join(ray_local, kill_after):
    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    learner, samplers = _make(kill_after, sampler_kwargs=[{}, {"init_s": 60}])
    sync = WeightSync()
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError) as err:
        sync.setup(learner, samplers, timeout_s=3)
    assert time.monotonic() - t0 < 15
    message = str(err.value)
    assert "NCCL setup (3 ranks at 127.0.0.1:29999) did not finish within 3 s" in message
    assert "still waiting on sampler 1 (finished: learner rank 0 (sender), sampler 0)" in message
    assert "restart" in message
    assert not sync.ready
    with pytest.raises(WeightSyncError, match="failed earlier"):
        sync.start_push(1, timeout_s=3)


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "label"), [("nccl", "NCCL"), ("gloo", "gloo")])
def test_push_timeout_names_the_sender(ray_local, kill_after, backend, label):
    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    learner, samplers = _make(kill_after, {"send_s": 60}, sampler_kwargs=[{}])
    sync = WeightSync(backend)
    sync.setup(learner, samplers, timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError) as err:
        sync.push(1, timeout_s=3)
    assert time.monotonic() - t0 < 15
    message = str(err.value)
    assert f"weight push of version 1 over {label} did not finish within 3 s" in message
    assert f"the {label} group is unusable now" in message
    assert (
        "still waiting on learner rank 0 (sender) (finished: learner rank 0 (export), sampler 0)"
        in message
    )
    assert sync.version == 0
    with pytest.raises(WeightSyncError, match="failed earlier"):
        sync.push(2, timeout_s=3)


@pytest.mark.slow
def test_push_non_blocking_poll_times_out(ray_local, kill_after):
    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    learner, samplers = _make(kill_after, sampler_kwargs=[{"receive_s": 60}])
    sync = WeightSync()
    sync.setup(learner, samplers, timeout_s=30)
    push = sync.start_push(1, timeout_s=2)
    assert push.poll() is None  # running, within the deadline: no error yet
    time.sleep(2.5)
    with pytest.raises(WeightSyncError, match="still waiting on sampler 0"):
        push.poll()


@pytest.mark.slow
def test_a_failing_side_is_reported_at_once(ray_local, kill_after):
    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    learner, samplers = _make(
        kill_after, {"send_s": 60}, sampler_kwargs=[{}, {"receive_error": "GPU fell off"}]
    )
    sync = WeightSync()
    sync.setup(learner, samplers, timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="(?s)sampler 1 failed: .*GPU fell off"):
        sync.push(1, timeout_s=60)
    assert time.monotonic() - t0 < 15  # not after the 60 s deadline


@pytest.mark.slow
def test_an_export_error_is_reported_under_the_export(ray_local, kill_after):
    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    learner, samplers = _make(
        kill_after, {"stage_error": "ZeRO gather failed"}, sampler_kwargs=[{}]
    )
    sync = WeightSync()
    sync.setup(learner, samplers, timeout_s=30)
    with pytest.raises(
        WeightSyncError, match=r"(?s)learner rank 0 \(export\) failed: .*ZeRO gather failed"
    ):
        sync.push(1, timeout_s=30)


@pytest.mark.slow
def test_a_sampler_serving_the_wrong_version_is_an_error(ray_local, kill_after):
    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    learner, samplers = _make(kill_after, sampler_kwargs=[{"report_version": 7}])
    sync = WeightSync()
    sync.setup(learner, samplers, timeout_s=30)
    with pytest.raises(WeightSyncError, match=r"samplers report versions \(7,\)"):
        sync.push(1, timeout_s=30)


def test_sync_argument_checks():
    from services.nccl_sync import WeightSync
    from services.rollout_service import WeightSyncError

    with pytest.raises(ValueError, match="must be one of"):
        WeightSync("ipc")
    sync = WeightSync()
    with pytest.raises(ValueError, match="timeout_s"):
        sync.setup(object(), [object()], timeout_s=0)
    with pytest.raises(ValueError, match="at least one sampler"):
        sync.setup(object(), [], timeout_s=1)
    with pytest.raises(WeightSyncError, match="not set up"):
        sync.start_push(1, timeout_s=1)
    with pytest.raises(ValueError, match="timeout_s"):
        sync.push(1, timeout_s=-1)


@pytest.mark.slow
def test_versions_must_increase(ray_local, kill_after):
    from services.nccl_sync import WeightSync

    learner, samplers = _make(kill_after, sampler_kwargs=[{}])
    sync = WeightSync()
    sync.setup(learner, samplers, timeout_s=30)
    sync.push(3, timeout_s=30)
    with pytest.raises(ValueError, match="not newer than 3"):
        sync.push(3, timeout_s=30)
    assert ray_local.get(learner.calls.remote())[-1] == ("send",)  # nothing was submitted


class _Rollout:
    """The rollout side a CollectivePublisher talks to (RolloutService's collective methods):
    the current members, what each push reached, which samplers were reported lost (a lost one
    leaves the members, as the producer's replacement is not started yet)."""

    def __init__(self, members) -> None:
        self.members, self.served, self.lost = list(members), [], []

    def collective_members(self):
        return list(self.members), 0

    def mark_served(self, version, handles):
        self.served.append((version, list(handles)))

    def collective_lost(self, handles, why):
        self.lost.append((list(handles), why))
        self.members = [h for h in self.members if h not in handles]


def _publisher(learner, rollout):
    from types import SimpleNamespace

    from services.weight_publisher import CollectivePublisher, make_weight_publisher

    publisher = make_weight_publisher(
        "gloo", SimpleNamespace(ranks=[learner]), rollout, timeout_s=30, wire_dtype="float32"
    )
    assert isinstance(publisher, CollectivePublisher) and publisher.backend == "gloo"
    return publisher


M = {"meta": "from-rank-0"}


@pytest.mark.slow
def test_publisher_reforms_the_group_when_the_samplers_change(ray_local, kill_after):
    """A replaced sampler and an added one: the next push closes the group on learner rank 0
    and on the members that stay, forms one with the current members (new world size, ranks in
    order) and pushes to all; the same version again goes out as a repeat."""
    learner, (s0, s1, s2, s3) = _make(kill_after, sampler_kwargs=[{}, {}, {}, {}])
    rollout = _Rollout([s0, s1])
    publisher = _publisher(learner, rollout)
    publisher.publish(1)
    rollout.members = [s0, s2]  # sampler 1 was replaced by sampler 2
    publisher.publish(2)
    rollout.members = [s0, s2, s3]  # one added: the current version, again, to all
    publisher.publish(2)
    publisher.publish(3)  # the same members: no re-form
    publisher.close()
    assert rollout.served == [(1, [s0, s1]), (2, [s0, s2]), (2, [s0, s2, s3]), (3, [s0, s2, s3])]
    assert len(publisher.reforms) == 2 and rollout.lost == []
    learner_calls = ray_local.get(learner.calls.remote())
    inits = [c[3] for c in learner_calls if c[0] == "init"]
    assert inits == [3, 3, 4]  # world sizes
    assert [c[0] for c in learner_calls].count("close") == 3
    assert ray_local.get(s0.calls.remote()) == [
        ("init", "127.0.0.1", 29999, 1, 3),
        ("receive", M, 1),
        ("close",),
        ("init", "127.0.0.1", 29999, 1, 3),
        ("receive", M, 2),
        ("close",),
        ("init", "127.0.0.1", 29999, 1, 4),
        ("receive", M, 2, "repeat"),
        ("receive", M, 3),
        ("close",),
    ]
    # the replaced sampler is not called again (its end of the group went with it)
    assert ray_local.get(s1.calls.remote()) == [
        ("init", "127.0.0.1", 29999, 2, 3),
        ("receive", M, 1),
    ]
    assert ray_local.get(s3.calls.remote()) == [
        ("init", "127.0.0.1", 29999, 3, 4),
        ("receive", M, 2, "repeat"),
        ("receive", M, 3),
        ("close",),
    ]


@pytest.mark.slow
def test_publisher_leaves_out_a_dead_member_before_the_group_forms(ray_local, kill_after):
    """A member that died unnoticed would leave the others blocked in the rendezvous: it is
    found before the group forms, reported lost (to be replaced), and the group forms without it."""
    learner, (s0, s1, s2) = _make(kill_after, sampler_kwargs=[{}, {}, {}])
    rollout = _Rollout([s0, s1])
    publisher = _publisher(learner, rollout)
    publisher.publish(1)
    ray_local.kill(s1)
    _wait_dead(ray_local, s1)  # ray.kill returns before the actor is gone
    rollout.members = [s0, s1, s2]  # sampler 2 was added; sampler 1's death is not seen yet
    publisher.publish(2)
    assert [(h, "found dead before a push" in why) for hs, why in rollout.lost for h in hs] == [
        (s1, True)
    ]
    assert rollout.served[-1] == (2, [s0, s2])
    assert ray_local.get(s2.calls.remote()) == [
        ("init", "127.0.0.1", 29999, 2, 3),
        ("receive", M, 2),
    ]


def _wait_dead(ray, actor) -> None:
    """Until a call to ``actor`` fails as a dead actor's does (an event, not a duration)."""
    from ray.exceptions import RayActorError

    for _ in range(600):
        try:
            ray.get(actor.calls.remote(), timeout=30)
        except RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"{actor} still answers after ray.kill")


@pytest.mark.slow
def test_a_member_that_dies_as_the_old_group_closes_is_lost_not_fatal(ray_local, kill_after):
    """A kill that lands between the liveness check and the close of the old group (the member
    is alive when checked, dead when its end of the group is closed): it is reported lost and
    the group re-forms without it, instead of the publish failing on the teardown."""
    learner, (s0, s1, s2) = _make(kill_after, sampler_kwargs=[{}, {"close_exits": True}, {}])
    rollout = _Rollout([s0, s1])
    publisher = _publisher(learner, rollout)
    publisher.publish(1)
    rollout.members = [s0, s1, s2]  # sampler 2 added: the group re-forms; sampler 1 dies in it
    publisher.publish(2)
    assert [(hs, "as the gloo group closed" in why) for hs, why in rollout.lost] == [([s1], True)]
    assert rollout.served[-1] == (2, [s0, s2])
    assert ray_local.get(s2.calls.remote()) == [
        ("init", "127.0.0.1", 29999, 2, 3),
        ("receive", M, 2),
    ]


@pytest.mark.slow
def test_publisher_recovers_from_a_death_during_a_push(ray_local, kill_after, monkeypatch):
    """A member dies inside a push: the members that had not finished (blocked in the broken
    broadcast) are stopped and reported lost with it, the group is closed on the rest and
    re-formed, and the push is made again, as a repeat for those that already got it."""
    import services.weight_publisher as wp

    monkeypatch.setattr(wp, "SETTLE_S", 1.0)
    learner, (s0, s1, s2) = _make(
        kill_after, sampler_kwargs=[{}, {"receive_exits": True}, {"receive_s": 60}]
    )
    rollout = _Rollout([s0, s1, s2])
    publisher = _publisher(learner, rollout)
    publisher.publish(1)
    ((lost, why),) = rollout.lost
    assert lost == [s1, s2] and "sampler 1 died" in why
    assert rollout.served == [(1, [s0])] and len(publisher.reforms) == 1
    assert ray_local.get(s0.calls.remote()) == [
        ("init", "127.0.0.1", 29999, 1, 4),
        ("receive", M, 1),
        ("close",),
        ("init", "127.0.0.1", 29999, 1, 2),
        ("receive", M, 1, "repeat"),
    ]
    with pytest.raises(Exception, match="died|dead"):
        ray_local.get(s2.calls.remote(), timeout=10)  # stopped while blocked in the push
