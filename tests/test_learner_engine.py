"""LearnerEngine with real DeepSpeed on CPU (one rank): export, ZeRO stages, checkpoints, HF save.

DeepSpeed initialises torch.distributed for the whole process, so the engines run in one
spawned worker process per module (the pytest process, which may also host vLLM engines, stays
clean). The worker functions return plain data; the assertions run here.
"""

import math
import multiprocessing
import socket
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from learner_settings import loss_settings, optim_settings
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from learner.batch import collate
from learner.step import global_normaliser
from rollout.records import Rollout, ScoredRollout

pytestmark = pytest.mark.slow

VOCAB = 32
LOSS = loss_settings(divergence="forward_kl")


def save_tiny_student(path: Path, *, tie: bool = False) -> str:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: i + 3 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz +-")})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(path)
    return str(path)


def make_batch(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    scored = []
    for i in range(n):
        P, R = 2 + i % 3, 3 + (2 * i) % 5
        ids = torch.randint(0, VOCAB, (P + R,), generator=g).tolist()
        logp = (-3.5 + 0.5 * torch.randn(2 * R, generator=g)).clamp(max=0).tolist()
        rollout = Rollout(
            f"p{i}/0", f"p{i}", "", tuple(ids[:P]), tuple(ids[P:]), tuple(logp[:R]), 0, "stop"
        )
        scored.append(ScoredRollout(rollout=rollout, logp_teacher=tuple(logp[R:])))
    return collate(scored, pad_id=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------- run in the worker process


def _engine(model_dir, stage, **kw):
    from learner.engine import LearnerEngine

    return LearnerEngine(
        model_path=model_dir,
        optim=optim_settings(zero_stage=stage, **kw),
        loss=LOSS,
        rank=0,
        world_size=1,
        master_addr="127.0.0.1",
        master_port=free_port(),
    )


def _step(engine, batch, version=0):
    n = global_normaliser(batch, LOSS.aggregation)
    return engine.train_step(batch, normaliser=n)


def _stages_and_export(model_dir, batch):
    from learner.engine import resolve_precision

    out = {"auto": resolve_precision("auto")}
    for stage in (0, 1, 3):
        engine = _engine(model_dir, stage, lr=1e-3)
        before = engine.export_weights()
        metrics = _step(engine, batch)
        out[stage] = (before, metrics, engine.export_weights())
    return out


def _checkpoint_round_trip(model_dir, ckpt_dir, batches, stage):
    kw = dict(lr=1e-2, lr_schedule="cosine", warmup_steps=1, total_steps=4, grad_clip=0.5)
    a = _engine(model_dir, stage, **kw)
    _step(a, batches[0])
    saved_at = a.save_checkpoint(ckpt_dir, {"step": 1, "note": ["x", 2]})
    at_save = a.export_weights()
    metrics_a = _step(a, batches[1], version=1)
    after_a = a.export_weights()

    b = _engine(model_dir, stage, **kw)
    state = b.load_checkpoint(ckpt_dir)
    restored = b.export_weights()
    steps_b = b.global_steps
    metrics_b = _step(b, batches[1], version=1)
    after_b = b.export_weights()
    return dict(
        saved_at=str(saved_at), state=state, at_save=at_save, restored=restored, steps=steps_b,
        after_a=after_a, after_b=after_b, metrics_a=metrics_a, metrics_b=metrics_b,
    )  # fmt: skip


def _crash_safety(model_dir, ckpt_dir, batch):
    root = Path(ckpt_dir)
    engine = _engine(model_dir, 1)
    _step(engine, batch)
    engine.save_checkpoint(root, {"step": 1})
    # A save of step 2 that crashed: a half-written .partial and a renamed but unannounced tag.
    (root / "step_00000002.partial").mkdir()
    (root / "step_00000002.partial" / "junk").write_text("x")
    (root / "step_00000002").mkdir()
    (root / "step_00000002" / "junk").write_text("x")
    out = {"latest_after_crash": (root / "latest").read_text()}
    _step(engine, batch)
    engine.save_checkpoint(root, {"step": 2})
    out["junk_left"] = (root / "step_00000002" / "junk").exists()
    for _ in range(2):
        _step(engine, batch)
        engine.save_checkpoint(root, {}, keep=2)
    out["latest"] = (root / "latest").read_text()
    # (DeepSpeed also drops its zero_to_fp32 helper scripts into the folder.)
    out["listing"] = sorted(
        p.name for p in root.iterdir() if p.name.startswith(("step_", "latest"))
    )
    return out


def _save_twice(model_dir, ckpt_dir):
    engine = _engine(model_dir, 1)
    engine.save_checkpoint(ckpt_dir, {})
    engine.save_checkpoint(ckpt_dir, {})  # same step: must refuse to replace the latest


def _save_hf(model_dir, out_dir, batch):
    engine = _engine(model_dir, 3, lr=1e-2)
    _step(engine, batch)
    engine.save_hf(out_dir)
    return engine.export_weights()


def _bf16_and_fp32(model_dir, batch):
    """One step from the same weights in each precision; what the bf16 engine holds while it
    trains: the module's dtypes and those of the tensors its optimizer updates (the masters)."""
    out = {}
    for precision in ("bf16", "fp32"):
        engine = _engine(model_dir, 1, precision=precision)
        before = engine.export_weights()
        metrics = _step(engine, batch)
        inner = getattr(engine.engine.optimizer, "optimizer", engine.engine.optimizer)
        out[precision] = dict(
            metrics=metrics,
            before=before,
            after=engine.export_weights(),
            module_dtypes={str(p.dtype) for p in engine.engine.module.parameters()},
            master_dtypes={str(p.dtype) for g in inner.param_groups for p in g["params"]},
        )
    return out


def _nan_step(model_dir, batch, nan_batch):
    """A NaN in a batch (a test double for a broken scorer: one teacher log-prob planted NaN
    after collation): the step stops before the optimizer step; the next good step trains."""
    from learner.step import NonFiniteError

    engine = _engine(model_dir, 1, lr=1e-2)
    before = engine.export_weights()
    try:
        _step(engine, nan_batch)
        message = None
    except NonFiniteError as exc:
        message = str(exc)
    after = engine.export_weights()
    steps = engine.global_steps
    metrics = _step(engine, batch)
    return dict(message=message, before=before, after=after, steps=steps, metrics=metrics,
                steps_after_good=engine.global_steps)  # fmt: skip


def _nan_grad_step(model_dir, batch):
    """A finite loss whose gradient is NaN (a test double: a hook on one weight's gradient):
    the step stops before the optimizer step. ZeRO stage 0: the reduced gradients are still in
    ``.grad`` before step() (ZeRO >= 1 has the norm only inside step(); LearnerGroup checks it
    right after)."""
    from learner.step import NonFiniteError

    engine = _engine(model_dir, 0, lr=1e-2)
    before = engine.export_weights()
    param = next(p for p in engine.engine.module.parameters() if p.requires_grad)
    hook = param.register_hook(lambda g: g * float("nan"))
    try:
        _step(engine, batch)
        message = None
    except NonFiniteError as exc:
        message = str(exc)
    hook.remove()
    return dict(message=message, before=before, after=engine.export_weights(),
                steps=engine.global_steps)  # fmt: skip


# ----------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def worker():
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("student"))


def test_export_names_and_zero_stages_agree(worker, student):
    batch = make_batch(6, seed=1)
    out = worker.submit(_stages_and_export, student, batch).result()
    assert out["auto"] == "fp32"
    hf = AutoModelForCausalLM.from_pretrained(student)
    names = [n for n, _ in hf.named_parameters()]
    assert names == list(hf.state_dict())  # untied: every checkpoint tensor is a parameter
    for stage in (0, 1, 3):
        before, metrics, after = out[stage]
        assert [n for n, _ in before] == names
        for (_, t), ref in zip(before, hf.parameters(), strict=True):
            assert t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
            assert torch.equal(t, ref.detach())
        assert metrics["learner/grad_norm"] > 0
        assert metrics["learner/lr"] == pytest.approx(1e-3)
    # Same step under ZeRO 0, 1 and 3 (3 gathers its partitions on export). Not bit-equal: the
    # reductions differ, and Adam's first step g/(|g|+eps) amplifies that on tiny gradients.
    ref_metrics, ref_after = out[1][1], out[1][2]
    for stage in (0, 3):
        _, metrics, after = out[stage]
        assert metrics["learner/loss"] == pytest.approx(ref_metrics["learner/loss"], rel=1e-6)
        assert metrics["learner/grad_norm"] == pytest.approx(
            ref_metrics["learner/grad_norm"], rel=1e-5
        )
        for (n, t), (_, r) in zip(after, ref_after, strict=True):
            torch.testing.assert_close(t, r, rtol=0, atol=1e-5, msg=n)
    assert any(not torch.equal(t, b) for (_, t), (_, b) in zip(ref_after, out[1][0], strict=True))


@pytest.mark.parametrize("stage", [1, 3])
def test_checkpoint_round_trip_is_exact(worker, student, tmp_path, stage):
    batches = [make_batch(4, seed=2), make_batch(5, seed=3)]
    out = worker.submit(_checkpoint_round_trip, student, str(tmp_path), batches, stage).result()
    assert Path(out["saved_at"]).name == "step_00000001"
    assert (tmp_path / "latest").read_text() == "step_00000001"
    assert out["state"] == {"step": 1, "note": ["x", 2]}
    assert out["steps"] == 1
    for (n, t), (_, r) in zip(out["restored"], out["at_save"], strict=True):
        assert torch.equal(t, r), n
    # Optimizer moments and the lr schedule came back too: the next step is identical.
    assert out["metrics_b"]["learner/lr"] == out["metrics_a"]["learner/lr"]
    assert out["metrics_b"]["learner/loss"] == out["metrics_a"]["learner/loss"]
    for (n, t), (_, r) in zip(out["after_b"], out["after_a"], strict=True):
        assert torch.equal(t, r), n


def test_checkpoint_save_is_crash_safe_and_prunes(worker, student, tmp_path):
    out = worker.submit(_crash_safety, student, str(tmp_path), make_batch(3, seed=4)).result()
    assert out["latest_after_crash"] == "step_00000001"
    assert not out["junk_left"]
    assert out["latest"] == "step_00000004"
    assert out["listing"] == ["latest", "step_00000003", "step_00000004"]


def test_checkpoint_refuses_to_overwrite_the_latest(worker, student, tmp_path):
    with pytest.raises(FileExistsError, match="latest"):
        worker.submit(_save_twice, student, str(tmp_path)).result()
    assert (tmp_path / "latest").read_text() == "step_00000000"


def test_save_hf_loads_back_with_tokenizer(worker, student, tmp_path):
    out_dir = tmp_path / "hf"
    weights = worker.submit(_save_hf, student, str(out_dir), make_batch(4, seed=5)).result()
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    loaded = dict(model.named_parameters())
    assert list(loaded) == [n for n, _ in weights]
    for n, t in weights:
        assert torch.equal(loaded[n].detach(), t), n
    tok = AutoTokenizer.from_pretrained(out_dir)
    assert tok.pad_token == "<pad>"
    assert tok.decode(tok("ab+c")["input_ids"]) == "ab+c"


def _update(run) -> torch.Tensor:
    return torch.cat(
        [(a - b).flatten() for (_, a), (_, b) in zip(run["after"], run["before"], strict=True)]
    )


def test_bf16_trains_on_cpu(worker, student):
    """bf16 really runs in bf16 (the module's weights), keeps float32 masters (what the
    optimizer steps), and its step matches the fp32 step to bf16 accuracy."""
    out = worker.submit(_bf16_and_fp32, student, make_batch(4, seed=6)).result()
    bf16, fp32 = out["bf16"], out["fp32"]
    assert bf16["module_dtypes"] == {"torch.bfloat16"}
    assert bf16["master_dtypes"] == {"torch.float32"}
    assert fp32["module_dtypes"] == fp32["master_dtypes"] == {"torch.float32"}
    assert all(math.isfinite(v) for v in bf16["metrics"].values())
    # The same loss and gradient norm to bf16 precision (8 bits of mantissa: ~0.4 %), but not
    # bit-equal: the forward pass did run in bf16.
    for key in ("learner/loss", "distill/divergence", "learner/grad_norm"):
        assert bf16["metrics"][key] == pytest.approx(fp32["metrics"][key], rel=2e-2), key
    assert bf16["metrics"]["learner/loss"] != fp32["metrics"]["learner/loss"]
    # The step moved the weights the way the fp32 step did (Adam's first step is about
    # lr·sign(g) per weight; bf16 rounding flips a few signs and adds its own rounding).
    up_bf16, up_fp32 = _update(bf16), _update(fp32)
    assert up_bf16.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(up_bf16, up_fp32, dim=0) > 0.95


def test_lr_schedule():
    from learner.schedule import lr_factor

    warm = [lr_factor(s, schedule="cosine", warmup_steps=2, total_steps=6) for s in range(7)]
    assert warm[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert warm[4] == pytest.approx(0.5)
    assert warm[6] == pytest.approx(0.0)
    assert lr_factor(9, schedule="constant", warmup_steps=0, total_steps=1) == 1.0


def test_a_nan_in_the_batch_stops_the_step_before_the_optimizer(worker, student):
    import dataclasses

    batch = make_batch(4, seed=7)
    teacher = batch.logp_teacher_BT.clone()
    teacher[2, int(batch.response_mask_BT[2].nonzero()[0])] = float("nan")
    nan_batch = dataclasses.replace(batch, logp_teacher_BT=teacher)
    out = worker.submit(_nan_step, student, batch, nan_batch).result()
    assert out["message"] is not None and "teacher log-probs: 1 NaN" in out["message"]
    assert out["steps"] == 0  # no optimizer step was taken
    for (n, a), (_, b) in zip(out["after"], out["before"], strict=True):
        assert torch.equal(a, b), n
    assert out["steps_after_good"] == 1
    assert all(math.isfinite(v) for v in out["metrics"].values())


def test_a_nan_gradient_stops_the_step_before_the_optimizer(worker, student):
    out = worker.submit(_nan_grad_step, student, make_batch(4, seed=7)).result()
    assert out["message"] is not None and "gradient norm = nan" in out["message"]
    assert out["steps"] == 0  # no optimizer step was taken
    for (n, a), (_, b) in zip(out["after"], out["before"], strict=True):
        assert torch.equal(a, b), n
