"""OPD+ top-K through the pipeline: records, collation, the learner step, and (slow) the real vLLM
teacher's top-K against transformers' full softmax."""

import pytest
import torch
from learner_settings import loss_of
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batch import collate, split
from learner.dense import dense_surrogate_loss
from learner.step import global_normaliser
from rollout.alignment import response_positions
from rollout.records import RecordError, Rollout, ScoredRollout

VOCAB, K = 32, 4


def rollout(sid, prompt, response, version=0):
    return Rollout(
        sample_id=sid,
        problem_id=sid.split("/")[0],
        answer="",
        prompt_ids=tuple(prompt),
        response_ids=tuple(response),
        logp_sampler=tuple(-0.5 for _ in response),
        policy_version=version,
        finish_reason="stop",
    )


def scored_with_topk(r, ids, logps):
    return ScoredRollout(
        rollout=r,
        logp_teacher=tuple(-1.0 for _ in r.response_ids),
        teacher_topk_ids=tuple(tuple(x) for x in ids),
        teacher_topk_logp=tuple(tuple(x) for x in logps),
    )


def test_scored_rollout_checks_topk():
    r = rollout("a/0", [1, 2], [3, 4])
    ok = scored_with_topk(r, [[3, 5], [4, 6]], [[-0.1, -2.0], [-0.2, -3.0]])
    assert ok.topk == 2
    assert ScoredRollout(rollout=r, logp_teacher=(-1.0, -1.0)).topk == 0
    bad = {
        "positions": ([[3, 5]], [[-0.1, -2.0]]),
        "ragged": ([[3, 5], [4]], [[-0.1, -2.0], [-0.2]]),
        "ids vs log-probs": ([[3, 5], [4, 6]], [[-0.1, -2.0], [-0.2]]),
        "duplicate ids": ([[3, 3], [4, 6]], [[-0.1, -2.0], [-0.2, -3.0]]),
        "positive log-prob": ([[3, 5], [4, 6]], [[0.5, -2.0], [-0.2, -3.0]]),
        "NaN log-prob": ([[3, 5], [4, 6]], [[float("nan"), -2.0], [-0.2, -3.0]]),
    }
    for what, (ids, logps) in bad.items():
        with pytest.raises(RecordError, match="a/0"):
            scored_with_topk(r, ids, logps)
            pytest.fail(what)
    with pytest.raises(RecordError, match="come together"):
        ScoredRollout(rollout=r, logp_teacher=(-1.0, -1.0), teacher_topk_ids=((3,), (4,)))


def test_collate_places_topk_at_response_columns_and_split_keeps_it():
    a = scored_with_topk(
        rollout("a/0", [5, 6, 7], [8, 9]), [[8, 1], [9, 2]], [[-0.1, -3.0], [-0.2, -4.0]]
    )
    b = scored_with_topk(
        rollout("b/0", [5], [10, 11, 12]),
        [[10, 1], [11, 2], [12, 3]],
        [[-0.3, -5.0], [-0.4, -6.0], [-0.5, -7.0]],
    )
    batch = collate([a, b], pad_id=0)
    assert batch.topk == 2
    assert batch.teacher_topk_ids_BTK.dtype == torch.int64
    assert batch.teacher_topk_logp_BTK.dtype == torch.float32
    # Row a: prompt 5 6 7 | response 8 9 → columns 3, 4. Row b: prompt 5 | 10 11 12 → 1..3.
    z = [0, 0]
    assert batch.teacher_topk_ids_BTK.tolist() == [
        [z, z, z, [8, 1], [9, 2]],
        [z, [10, 1], [11, 2], [12, 3], z],
    ]
    assert batch.teacher_topk_logp_BTK[1, 3].tolist() == pytest.approx([-0.5, -7.0])
    assert batch.teacher_topk_logp_BTK[0, :3].abs().sum() == 0
    # Column i's top-K describes π(· | x_<i), the distribution x_i was drawn from.
    assert (batch.teacher_topk_ids_BTK[..., 0] == batch.input_ids_BT * batch.response_mask_BT).all()
    shards = split(batch, 2)
    assert [s.topk for s in shards] == [2, 2]
    joined = torch.cat([s.teacher_topk_logp_BTK for s in shards])
    torch.testing.assert_close(joined, batch.teacher_topk_logp_BTK)
    plain = collate([ScoredRollout(rollout=a.rollout, logp_teacher=a.logp_teacher)], pad_id=0)
    assert plain.topk == 0 and split(plain, 1)[0].teacher_topk_ids_BTK is None


def test_collate_refuses_mixed_or_unequal_topk():
    r = rollout("a/0", [1], [3])
    two = scored_with_topk(r, [[3, 5]], [[-0.1, -2.0]])
    three = scored_with_topk(r, [[3, 5, 6]], [[-0.1, -2.0, -3.0]])
    with pytest.raises(ValueError, match="different teacher top-K"):
        collate([two, three], pad_id=0)
    with pytest.raises(ValueError, match="some rollouts carry"):
        collate([two, ScoredRollout(rollout=r, logp_teacher=(-1.0,))], pad_id=0)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def random_topk_batch(n=4, seed=0, k=K):
    """Rollouts with a random teacher (a random distribution per position) and its top-k."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, R = 2 + i % 2, 3 + i
        ids = torch.randint(0, VOCAB, (P + R,), generator=g).tolist()
        teacher_RV = (2.0 * torch.randn(R, VOCAB, generator=g)).log_softmax(-1)
        top = teacher_RV.topk(k, -1)
        r = rollout(f"p{i}/0", ids[:P], ids[P:], version=i % 2)
        r = Rollout(
            **{
                **{f: getattr(r, f) for f in r.__slots__},
                "logp_sampler": tuple((-2.0 + 0.3 * torch.randn(R, generator=g)).tolist()),
            }
        )
        logp_teacher = teacher_RV.gather(-1, torch.tensor(ids[P:])[:, None])[:, 0]
        out.append(
            ScoredRollout(
                rollout=r,
                logp_teacher=tuple(logp_teacher.tolist()),
                teacher_topk_ids=tuple(tuple(x) for x in top.indices.tolist()),
                teacher_topk_logp=tuple(tuple(x) for x in top.values.tolist()),
            )
        )
    return out


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_step_uses_the_dense_loss_on_a_topk_batch(aggregation):
    """compute_loss on a top-K batch = dense_surrogate_loss from the full log-softmax, and its
    gradient; the same rollouts without top-K give a different (sampled-token) loss."""
    model = tiny_llama()
    scored = random_topk_batch()
    batch = collate(scored, pad_id=0)
    kw = dict(divergence="js", discount=1.0, ratio_clip=10.0, is_cap=2.0)
    normaliser = global_normaliser(batch, aggregation)
    loss, stats = loss_of(
        model,
        batch,
        estimator="opd_plus",
        aggregation=aggregation,
        normaliser=normaliser,
        **kw,
    )
    grads = torch.autograd.grad(loss, list(model.parameters()))

    logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    logp_BTV = torch.nn.functional.pad(logits[:, :-1].log_softmax(-1), (0, 0, 1, 0))
    logp_topk = logp_BTV.gather(-1, batch.teacher_topk_ids_BTK)
    logp_learner = logp_BTV.gather(-1, batch.input_ids_BT[..., None])[..., 0]
    ref, ref_stats = dense_surrogate_loss(
        logp_topk,
        batch.teacher_topk_logp_BTK,
        logp_learner,
        batch.logp_sampler_BT,
        batch.response_mask_BT,
        aggregation=aggregation,
        normaliser=normaliser,
        **kw,
    )
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-6)
    assert stats.divergence == pytest.approx(ref_stats.divergence, rel=1e-5)
    assert stats.divergence > 0 and stats.num_tokens == batch.num_response_tokens

    sampled = collate(
        [ScoredRollout(rollout=s.rollout, logp_teacher=s.logp_teacher) for s in scored], pad_id=0
    )
    plain, _ = loss_of(
        model,
        sampled,
        estimator="opd_plus",
        aggregation=aggregation,
        normaliser=normaliser,
        **kw,
    )
    assert abs(plain.item() - loss.item()) > 1e-3


def test_dense_step_shards_sum_to_the_full_batch():
    model = tiny_llama(1)
    batch = collate(random_topk_batch(n=5, seed=3), pad_id=0)
    kw = dict(
        divergence="forward_kl",
        estimator="opd_plus",
        discount=0.5,
        ratio_clip=10.0,
        is_cap=2.0,
        aggregation="token_mean",
        normaliser=global_normaliser(batch, "token_mean"),
    )
    full, _ = loss_of(model, batch, **kw)
    parts = sum(loss_of(model, shard, **kw)[0] for shard in split(batch, 2))
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_vllm_teacher_topk_matches_transformers(toy_pair):
    """TeacherEngine.score with teacher_topk = K: exactly the teacher's top-K at each response
    position (not the top-K plus the scored token vLLM adds), matching transformers' full
    softmax to ~1e-4, on sampled-looking and on random responses."""
    from transformers import AutoModelForCausalLM

    from rollout.engine import EngineSettings, TeacherEngine

    model = AutoModelForCausalLM.from_pretrained(toy_pair.teacher_dir, dtype=torch.float32).eval()
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts, responses = [], []
    for i in range(6):
        prompt = torch.randint(3, V, (3 + i,), generator=g).tolist()
        if i % 2:  # greedy continuation: the scored token is the teacher's top-1
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6
                )
            response = out[0, len(prompt) :].tolist()
        else:  # random tokens: mostly outside the top-K
            response = torch.randint(3, V, (7,), generator=g).tolist()
        prompts.append(prompt)
        responses.append(response)

    engine = TeacherEngine(
        EngineSettings(
            model_path=str(toy_pair.teacher_dir), kv_cache_mb=64, max_model_len=64, teacher_topk=K
        )
    )
    try:
        results = engine.score(prompts, responses)
    finally:
        engine.close()

    outside = 0
    for p, r, res in zip(prompts, responses, results, strict=True):
        res.scored(rollout("x/0", p, r))  # the record accepts what the engine returns
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
        logp_TV = logits.log_softmax(-1)[response_positions(len(p), len(r)).start - 1 : -1]
        ref = logp_TV.topk(K, -1)
        got_ids = torch.tensor(res.topk_ids)
        got_logp = torch.tensor(res.topk_logp)
        assert got_ids.shape == (len(r), K)
        assert (got_ids == ref.indices).all(), (got_ids, ref.indices)
        torch.testing.assert_close(got_logp, ref.values, rtol=0, atol=1e-4)
        sampled = logp_TV.gather(-1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(res.logp_teacher), sampled, rtol=0, atol=1e-4)
        outside += sum(t not in ids for t, ids in zip(r, got_ids.tolist(), strict=True))
    assert outside >= 5  # the case where vLLM returns K + 1 entries was exercised
