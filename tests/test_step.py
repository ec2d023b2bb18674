"""compute_loss on a tiny real HF Llama: invariants, and data-parallel shard invariance."""

import pytest
import torch
from learner_settings import loss_of
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batch import collate, split
from learner.step import global_normaliser, merge_metrics
from rollout.alignment import response_positions, token_logprobs
from rollout.records import Rollout, ScoredRollout

VOCAB = 32


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def random_scored(n, seed=0, version=0):
    """n rollouts of uneven prompt/response lengths with random sampler/teacher log-probs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, R = 2 + i % 3, 3 + (2 * i) % 5
        ids = torch.randint(0, VOCAB, (P + R,), generator=g).tolist()
        logp = (-3.5 + 0.5 * torch.randn(2 * R, generator=g)).clamp(max=0).tolist()
        rollout = Rollout(
            sample_id=f"p{i}/0",
            problem_id=f"p{i}",
            answer="",
            prompt_ids=tuple(ids[:P]),
            response_ids=tuple(ids[P:]),
            logp_sampler=tuple(logp[:R]),
            policy_version=version + i % 2,
            finish_reason="stop",
        )
        out.append(ScoredRollout(rollout=rollout, logp_teacher=tuple(logp[R:])))
    return out


def with_own_logprobs(model, scored):
    """The same rollouts with sampler and teacher log-probs replaced by the model's own."""
    batch = collate(scored, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        logp_BT = token_logprobs(logits, batch.input_ids_BT)
    out = []
    for b, s in enumerate(scored):
        r = s.rollout
        own = tuple(logp_BT[b, response_positions(len(r.prompt_ids), len(r.response_ids))].tolist())
        rollout = Rollout(**{**{f: getattr(r, f) for f in r.__slots__}, "logp_sampler": own})
        out.append(ScoredRollout(rollout=rollout, logp_teacher=own))
    return out


DISTILL = dict(estimator="opd_plus", discount=0.0, ratio_clip=10.0, is_cap=2.0)


def test_student_equals_teacher_and_sampler_invariants():
    model = tiny_llama()
    batch = collate(with_own_logprobs(model, random_scored(5)), pad_id=0)
    n = global_normaliser(batch, "token_mean")
    loss, stats = loss_of(
        model, batch, divergence="forward_kl", aggregation="token_mean", normaliser=n, **DISTILL
    )
    assert stats.mismatch == pytest.approx(0.0, abs=1e-6)
    assert stats.is_weight_mean == pytest.approx(1.0, abs=1e-6)
    assert stats.is_truncated_frac == 0.0
    assert stats.divergence == pytest.approx(0.0, abs=1e-6)
    assert stats.ell_mean == pytest.approx(0.0, abs=1e-6)
    assert stats.clamped_frac == 0.0
    # Forward KL OPD+ at r = 1: A_t = −f'(1) = 1 on every token.
    assert stats.adv_abs_max == pytest.approx(1.0, abs=1e-5)
    assert stats.num_tokens == batch.num_response_tokens
    assert stats.num_sequences == 5
    # loss = Σ −A·w·logp / N = −mean logp over response tokens.
    mean_logp = (batch.logp_sampler_BT.sum() / n).item()
    assert loss.item() == pytest.approx(-mean_logp, rel=1e-5)


@pytest.mark.parametrize(
    "divergence,aggregation,discount",
    [("reverse_kl", "token_mean", 0.0), ("forward_kl", "seq_mean", 0.5), ("js", "token_mean", 1.0)],
)
def test_shards_with_global_normaliser_sum_to_full_batch(divergence, aggregation, discount):
    model = tiny_llama(seed=1)
    batch = collate(random_scored(7, seed=2), pad_id=0)
    kw = dict(
        divergence=divergence, estimator="opd_plus", discount=discount, ratio_clip=10.0,
        is_cap=2.0, aggregation=aggregation, normaliser=global_normaliser(batch, aggregation),
    )  # fmt: skip

    model.zero_grad()
    loss_full, stats_full = loss_of(model, batch, **kw)
    loss_full.backward()
    grads_full = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    loss_sum, shard_metrics = 0.0, []
    for shard in split(batch, 2):
        loss, stats = loss_of(model, shard, **kw)
        loss.backward()  # accumulates: the shards' gradients add up
        loss_sum += loss.item()
        shard_metrics.append(stats.metrics())

    assert loss_sum == pytest.approx(loss_full.item(), rel=1e-5)
    for g_full, p in zip(grads_full, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g_full, rtol=1e-5, atol=1e-7)

    merged, full = merge_metrics(shard_metrics), stats_full.metrics()
    assert merged.keys() == full.keys()
    for key in full:
        assert merged[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key


def test_global_normaliser_counts():
    scored = random_scored(3)
    empty = ScoredRollout(
        rollout=Rollout("e/0", "e", "", (1, 2), (), (), 0, "length"), logp_teacher=()
    )
    batch = collate([*scored, empty], pad_id=0)
    assert global_normaliser(batch, "token_mean") == batch.num_response_tokens
    assert global_normaliser(batch, "seq_mean") == 3.0  # the empty response does not count
    only_empty = collate([empty], pad_id=0)
    assert global_normaliser(only_empty, "token_mean") == 1.0
    with pytest.raises(ValueError, match="aggregation"):
        global_normaliser(batch, "sum")


def test_merge_metrics_rules():
    a = {"learner/loss": 1.0, "learner/tokens": 3.0, "learner/sequences": 1.0,
         "distill/divergence": 0.3, "distill/adv_abs_max": 2.0,
         "learner/grad_norm": 5.0}  # fmt: skip
    b = {"learner/loss": 2.0, "learner/tokens": 1.0, "learner/sequences": 3.0,
         "distill/divergence": 0.7, "distill/adv_abs_max": 1.0,
         "learner/grad_norm": 5.0}  # fmt: skip
    m = merge_metrics([a, b])
    assert m["learner/loss"] == 3.0
    assert m["learner/tokens"] == 4.0
    assert m["distill/divergence"] == pytest.approx((0.3 * 3 + 0.7 * 1) / 4)
    assert m["distill/adv_abs_max"] == 2.0
    assert m["learner/sequences"] == 4.0
    assert m["learner/grad_norm"] == 5.0


@pytest.mark.parametrize(
    "divergence, shifts", [("reverse_kl", True), ("forward_kl", True), ("js", False)]
)
def test_center_cost_is_a_constant_shift(divergence, shifts):
    """Centring subtracts f'(1) from each OPD+ immediate cost: reverse-KL OPD+ becomes the
    usual ell cost (= OPD for reverse KL at discount 0); divergences with f'(1) = 0 are untouched."""
    model = tiny_llama()
    batch = collate(random_scored(6), pad_id=0)
    kw = dict(
        divergence=divergence,
        discount=0.0,
        ratio_clip=10.0,
        is_cap=None,
        aggregation="token_mean",
        normaliser=global_normaliser(batch, "token_mean"),
    )
    raw, _ = loss_of(model, batch, estimator="opd_plus", **kw)
    centred, _ = loss_of(model, batch, estimator="opd_plus", center_cost=True, **kw)
    assert (abs(raw.item() - centred.item()) > 1e-3) is shifts
    if divergence == "reverse_kl":
        opd, _ = loss_of(model, batch, estimator="opd", **kw)
        assert centred.item() == pytest.approx(opd.item(), rel=1e-6, abs=1e-7)


# ----------------------------------------------------------------------------- NaN / Inf


def nan_teacher_batch(scored, row=1):
    """A test double for a broken scorer: the collated batch with one teacher log-prob NaN on
    a response token (records refuse a NaN, so it is planted after collation)."""
    import dataclasses

    batch = collate(scored, pad_id=0)
    teacher = batch.logp_teacher_BT.clone()
    col = int(batch.response_mask_BT[row].nonzero()[0])
    teacher[row, col] = float("nan")
    return dataclasses.replace(batch, logp_teacher_BT=teacher)


def test_a_nan_input_stops_the_loss_before_backward():
    from learner_settings import loss_settings

    from learner.step import NonFiniteError, compute_loss

    model = tiny_llama()
    batch = nan_teacher_batch(random_scored(4))
    settings = loss_settings(divergence="forward_kl")
    with pytest.raises(NonFiniteError, match="teacher log-probs: 1 NaN") as info:
        compute_loss(
            model, batch, settings=settings, normaliser=global_normaliser(batch, "token_mean")
        )
    assert "--resume" not in str(info.value)
    assert all(p.grad is None for p in model.parameters())  # no backward ran


def test_check_finite_names_the_step_and_the_last_finite_values():
    from learner.step import NonFiniteError, check_finite

    good = {"learner/loss": 0.25, "learner/grad_norm": 1.5, "distill/divergence": 0.1}
    check_finite(good, step=6, last=None)
    with pytest.raises(NonFiniteError) as info:
        check_finite(good | {"learner/grad_norm": float("inf")}, step=7, last=(6, good))
    message = str(info.value)
    assert message.startswith("learner step 7 stopped: learner/grad_norm = inf")
    assert "the last finite step was 6: loss = 0.25, grad_norm = 1.5, divergence = 0.1" in message
    assert "--resume" not in message and "Nothing of this step was published" in message
