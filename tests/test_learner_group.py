"""LearnerGroup on real Ray + DeepSpeed (CPU): two ranks take the same step as one rank.

This is the proof that the loss scaling for data parallelism is right: each rank's loss is
normalised by the global token count and multiplied by world_size, DeepSpeed averages the
gradients, and the result equals the single-rank gradient on the whole batch (same global grad
norm, same parameters after the step).
"""

import pytest
import ray
import torch
from learner_settings import loss_settings, optim_settings
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rollout.records import Rollout, ScoredRollout
from services.learner_group import LearnerGroup

pytestmark = pytest.mark.slow

VOCAB = 32
LOSS = loss_settings(divergence="js", discount=0.5, center_cost=True)


def make_group(student, *, num_ranks, zero_stage, cpus_per_rank=1.0):
    return LearnerGroup(
        student,
        pad_id=0,
        num_ranks=num_ranks,
        rank_options={"num_cpus": cpus_per_rank, "num_gpus": 0.0},
        optim=optim_settings(zero_stage=zero_stage),
        loss=LOSS,
    )


def scored_batch(n, seed=0, version=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, R = 2 + i % 3, 3 + (3 * i) % 7
        ids = torch.randint(0, VOCAB, (P + R,), generator=g).tolist()
        logp = (-3.5 + 0.5 * torch.randn(2 * R, generator=g)).clamp(max=0).tolist()
        rollout = Rollout(
            f"p{i}/0", f"p{i}", "", tuple(ids[:P]), tuple(ids[P:]), tuple(logp[:R]),
            version + i % 2, "stop",
        )  # fmt: skip
        out.append(ScoredRollout(rollout=rollout, logp_teacher=tuple(logp[R:])))
    return out


@pytest.fixture(scope="module")
def ray_cluster(_ray_session):
    from conftest import _ensure_ray

    _ensure_ray()
    yield


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("student")
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def rank_weights(group):
    """Every rank's own parameters (all ranks must take part: ZeRO-3 gathers are collective)."""
    return ray.get([r.export_weights.remote(keep_result=True) for r in group.ranks])


@pytest.fixture(scope="module")
def one_rank_reference(ray_cluster, student, tmp_path_factory):
    """One step on the full batch with a single rank, plus a checkpoint round trip."""
    group = make_group(student, num_ranks=1, zero_stage=1)
    metrics = group.train_step(scored_batch(6))
    weights = group.export_weights()

    ckpt = tmp_path_factory.mktemp("ckpt")
    group.save_checkpoint(ckpt, {"step": 1})
    next_batch = scored_batch(4, seed=9, version=1)
    continued = (group.train_step(next_batch), group.export_weights())
    state = group.load_checkpoint(ckpt)
    replayed = (group.train_step(next_batch), group.export_weights())
    nan = _nan_step(group, scored_batch(4, seed=11, version=2))
    group.shutdown()
    return dict(
        metrics=metrics, weights=weights, continued=continued, replayed=replayed, state=state,
        nan=nan,
    )  # fmt: skip


def _nan_step(group, scored):
    """Step 8 after a good step 7, with one teacher log-prob NaN: a test double for a broken
    scorer, planted past the record's own check (a ScoredRollout refuses a NaN)."""
    from learner.step import NonFiniteError

    group.train_step(scored, step=7)
    bad = scored[1]
    object.__setattr__(bad, "logp_teacher", (float("nan"), *bad.logp_teacher[1:]))
    before = group.export_weights()
    try:
        group.train_step(scored, step=8)
        message = None
    except NonFiniteError as exc:
        message = str(exc)
    return dict(message=message, before=before, after=group.export_weights())


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_two_ranks_equal_one_rank(one_rank_reference, student, tmp_path, zero_stage):
    group = make_group(student, num_ranks=2, zero_stage=zero_stage)
    metrics = group.train_step(scored_batch(6))
    per_rank = rank_weights(group)
    exported = group.export_weights()
    group.save_hf(tmp_path / "hf")
    group.shutdown()

    ref = one_rank_reference["metrics"]
    assert metrics["learner/loss"] == pytest.approx(ref["learner/loss"], rel=1e-5)
    # The global gradient norm would be halved if the per-rank loss were not scaled by world size.
    assert metrics["learner/grad_norm"] == pytest.approx(ref["learner/grad_norm"], rel=1e-5)
    for key in ("learner/tokens", "learner/sequences"):
        assert metrics[key] == ref[key], key
    for key in ("distill/divergence", "distill/mismatch", "distill/adv_abs_max"):
        assert metrics[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key

    for (n, a), (_, b) in zip(per_rank[0], per_rank[1], strict=True):
        assert torch.equal(a, b), f"ranks disagree on {n}"
    for (n, a), (_, b) in zip(exported, one_rank_reference["weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=n)
    assert [n for n, _ in exported] == [n for n, _ in per_rank[0]]

    hf = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").named_parameters())
    for n, t in exported:
        assert torch.equal(hf[n].detach(), t), n


def test_a_nan_loss_stops_the_step_naming_it_and_the_last_finite_values(one_rank_reference):
    nan = one_rank_reference["nan"]
    message = nan["message"]
    assert message is not None and message.startswith("learner step 8 stopped: ")
    assert "teacher log-probs: 1 NaN" in message
    assert "the last finite step was 7: loss = " in message and "grad_norm = " in message
    assert "--resume" not in message  # resuming would replay the same batch
    for (n, a), (_, b) in zip(nan["after"], nan["before"], strict=True):
        assert torch.equal(a, b), n  # the optimizer step was not applied


def test_group_checkpoint_round_trip(one_rank_reference):
    assert one_rank_reference["state"] == {"step": 1}
    (m_a, w_a), (m_b, w_b) = one_rank_reference["continued"], one_rank_reference["replayed"]
    assert m_a["learner/loss"] == m_b["learner/loss"]
    for (n, a), (_, b) in zip(w_a, w_b, strict=True):
        assert torch.equal(a, b), n


def test_group_rejects_a_folder_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        make_group(str(tmp_path), num_ranks=2, zero_stage=1)
