"""The collective weight path on CPU: vLLM's NCCL engine pair with a gloo communicator.

* the packed broadcast over a real gloo group keeps vLLM's chunk boundaries (no engine);
* the "gloo" engines reach vLLM's factories through the ``worker_extension_cls`` import, in the
  worker's own process, whatever process that is;
* a real CPU StudentEngine receives a push from ``WeightSender`` and then matches transformers
  on the new weights (the in-process worker: no Ray);
* a short toy run with ``rollout.sync_backend = "gloo"``: after every push the samplers'
  log-probs equal the learner's, versions and staleness as on the object-store path.

The control-plane tests that run against gloo on CPU are in tests/test_nccl_sync.py (re-forming
the group on a changed sampler set among them); restarts and live resizing over gloo, end to end,
are tests/test_chaos.py and tests/test_resize.py.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from engine_checks import worst_vs_transformers


def _free_port() -> tuple[str, int]:
    from services.cluster import free_node_address

    return free_node_address()


def _in_threads(*targets):
    """Run each callable in its own thread (collectives block until every rank is in)."""
    errors, results = [], [None] * len(targets)

    def run(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a rank did not finish"
    if errors:
        raise errors[0]
    return results


def test_packed_broadcast_keeps_vllms_chunk_boundaries():
    """Producer and consumer cut the stream where vLLM's pack_tensors does, across several
    chunks, and every tensor arrives bit for bit (one wire dtype per push, as the sender casts)."""
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    from rollout.weight_transfer import (
        GlooGroup,
        packed_broadcast_consumer,
        packed_broadcast_producer,
    )

    g = torch.Generator().manual_seed(0)
    named = [
        (f"w{i}", torch.randn(shape, generator=g, dtype=torch.bfloat16))
        for i, shape in enumerate([(3, 5), (7,), (2, 2), (1,)] * 3)
    ]
    buffer = 40  # bytes: forces a chunk every one to three tensors
    expected_chunks = []
    it = iter(named)
    while (chunk := pack_tensors(it, lambda item: item[1], buffer)) is not None:
        expected_chunks.append(chunk.names)
    assert len(expected_chunks) > 3

    host, port = _free_port()
    got: list[list[str]] = []
    received: dict[str, torch.Tensor] = {}

    def send():
        group = GlooGroup(host, port, 0, 2, timeout_s=60)
        packed_broadcast_producer(iter(named), group, buffer)
        group.destroy()

    def receive():
        group = GlooGroup(host, port, 1, 2, timeout_s=60)

        def load(chunk):
            got.append([n for n, _ in chunk])
            received.update((n, t.clone()) for n, t in chunk)

        meta = ((n, list(t.shape), t.dtype) for n, t in named)
        packed_broadcast_consumer(meta, group, load, buffer)
        group.destroy()

    _in_threads(send, receive)
    assert got == expected_chunks
    for name, tensor in named:
        assert torch.equal(received[name], tensor), name


def test_gloo_engines_are_registered_in_the_workers_process():
    """vLLM resolves ``worker_extension_cls`` in the worker's process before it builds the
    transfer engine; that import alone registers the gloo pair (a fresh interpreter stands in
    for a worker subprocess: GPU builds run the worker outside the caller)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    from rollout.weight_transfer import GlooTrainerWeightTransferEngine, GlooWeightTransferEngine

    assert WeightTransferEngineFactory._registry["gloo"]() is GlooWeightTransferEngine
    assert WeightTransferTrainerFactory._registry["gloo"]() is GlooTrainerWeightTransferEngine
    probe = (
        "from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory as F\n"
        "assert 'gloo' not in F._registry\n"
        "from vllm.utils.import_utils import resolve_obj_by_qualname\n"
        "resolve_obj_by_qualname('rollout.engine.WeightLoaderExtension')\n"
        "print(F._registry['gloo']().__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "GlooWeightTransferEngine"


# ================================================================= a real engine, no Ray


@pytest.fixture(scope="module")
def gloo_engine(tiny_model):
    from rollout.engine import EngineSettings, StudentEngine

    engine = StudentEngine(
        EngineSettings(
            model_path=str(tiny_model),
            dtype="float32",
            seed=0,
            kv_cache_mb=64,
            weight_transfer="gloo",
        )
    )
    yield engine
    engine.close()


def _worker_facts(worker):
    import os

    return os.getpid(), type(worker.weight_transfer_engine).__name__


@pytest.mark.slow
def test_gloo_push_into_a_real_engine_matches_transformers(gloo_engine, tiny_model):
    import os

    from transformers import AutoModelForCausalLM

    from rollout.weight_transfer import WeightReceiver, WeightSender

    engine = gloo_engine
    # The CPU build runs vLLM's worker in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one
    # worker: the "uni" executor), and that worker built the gloo engine registered above.
    ((pid, engine_cls),) = engine.llm.collective_rpc(_worker_facts)
    assert pid == os.getpid() and engine_cls == "GlooWeightTransferEngine"

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    host, port = _free_port()
    sender, receiver = _in_threads(
        lambda: WeightSender(host, port, 2, backend="gloo", dtype="float32"),
        lambda: WeightReceiver(engine, host, port, 1, 2),
    )
    try:
        for version, seed in ((1, 3), (2, 4)):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in hf.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
            meta = sender.stage([(n, p.detach().clone()) for n, p in hf.named_parameters()])
            _in_threads(sender.send_staged, lambda m=meta, v=version: receiver.receive(m, v))
            assert engine.version == version
            assert engine.llm.get_weight_version() == str(version)
            worst = worst_vs_transformers(engine, hf)
            assert worst < 1e-4, f"engine vs transformers after gloo push {version}: {worst}"
        with pytest.raises(Exception, match="not newer"):
            receiver.receive(meta, 2)
        # A re-formed group (services/weight_publisher.py, after a sampler set changed): both
        # ends leave the group, a new one forms on a new port, the current version goes out
        # again as a repeat, and the next one after it; the engine matches transformers.
        sender.close()
        receiver.close()
        host, port = _free_port()
        sender, receiver = _in_threads(
            lambda: WeightSender(host, port, 2, backend="gloo", dtype="float32"),
            lambda: WeightReceiver(engine, host, port, 1, 2),
        )
        for version, seed in ((2, None), (3, 5)):
            if seed is not None:
                g = torch.Generator().manual_seed(seed)
                with torch.no_grad():
                    for p in hf.parameters():
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
            meta = sender.stage([(n, p.detach().clone()) for n, p in hf.named_parameters()])
            _in_threads(
                sender.send_staged,
                lambda m=meta, v=version: receiver.receive(m, v, repeat=v == engine.version),
            )
            assert engine.version == version
            worst = worst_vs_transformers(engine, hf)
            assert worst < 1e-4, f"after a re-formed group's push {version}: {worst}"
    finally:
        sender.close()
        receiver.close()


# ================================================================== a toy run over gloo


@pytest.mark.slow
def test_toy_run_over_gloo_serves_the_learners_weights(ray_local, toy_pair, tmp_path):
    """Strictly on-policy (max_staleness 0, a push after every step): each step trains on
    samples of the version pushed after the step before, so the learner's log-probs of them
    (``distill/mismatch``, the mean |logp_learner − logp_sampler|) are those of the sampler;
    after a push over gloo they agree to the object-store path's tolerance."""
    from run_helpers import rows, small_config

    from services.driver import RunHooks, train
    from services.ledger import check_ledger
    from services.parts import sync_backend

    cfg = small_config(
        toy_pair,
        tmp_path,
        "gloo",
        3,
        **{"rollout.sync_backend": '"gloo"', "rollout.max_staleness": 0},
    )
    assert sync_backend(cfg) == "gloo"
    seen: dict[int, dict] = {}
    train(cfg, progress=False, hooks=RunHooks(on_step=lambda step, row: seen.update({step: row})))
    assert sorted(seen) == [1, 2, 3]
    for step, row in seen.items():
        assert row["rollout/staleness_max"] == 0, step
        assert row["distill/mismatch"] < 1e-4, (step, row["distill/mismatch"])
    ledger = rows(tmp_path / "gloo", "samples.jsonl")
    # step k is sampled at version k - 1: version 0 is the initial weights, 1 and 2 came by gloo
    assert [sorted(set(r["versions"])) for r in ledger] == [[0], [1], [2]]
    report = check_ledger(tmp_path / "gloo")
    assert report.ok, report.problems
