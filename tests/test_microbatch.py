"""Micro-batching with gradient accumulation: the accumulated step IS the full-batch step.

Fast part: the plan (budget, every row once, equal counts) and, in pure torch, that the micro-
batches' losses and gradients add up to the full batch's. Slow part: real DeepSpeed engines on
CPU, 1 and 2 ranks, ZeRO 1, 2 and 3: one learner step with micro-batches equals the step
without (loss, global grad norm, parameters after the optimizer step within 1e-5).
"""

import multiprocessing
import socket
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from learner_settings import loss_of, loss_settings, optim_settings
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batch import collate
from learner.microbatch import padding_cells, plan_micro_batches, row_lengths
from learner.step import global_normaliser, merge_metrics
from rollout.records import Rollout, ScoredRollout

VOCAB = 32
DISTILL = dict(
    divergence="js", estimator="opd_plus", discount=0.5, ratio_clip=10.0, is_cap=2.0,
    aggregation="token_mean", center_cost=True,
)  # fmt: skip


def scored(lengths, seed=0):
    """Rollouts with the given (prompt, response) lengths and random log-probs."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (P, R) in enumerate(lengths):
        ids = torch.randint(1, VOCAB, (P + R,), generator=g).tolist()
        logp = (-3.5 + 0.5 * torch.randn(2 * R, generator=g)).clamp(max=0).tolist()
        rollout = Rollout(
            f"p{i}/0", f"p{i}", "", tuple(ids[:P]), tuple(ids[P:]), tuple(logp[:R]), i % 2, "stop"
        )
        out.append(ScoredRollout(rollout=rollout, logp_teacher=tuple(logp[R:])))
    return out


LENGTHS = [(2, 9), (3, 1), (1, 4), (4, 6), (2, 2), (3, 8), (1, 3)]


def test_plan_respects_the_budget_and_keeps_every_row_once():
    batch = collate(scored(LENGTHS), pad_id=0)
    lengths = row_lengths(batch).tolist()
    assert plan_micro_batches(batch, 0) == [batch]
    for budget in (1, 11, 20, 33, 1000):
        micro = plan_micro_batches(batch, budget)
        ids = [s for mb in micro for s in mb.sample_ids]
        assert sorted(ids) == sorted(batch.sample_ids)
        for mb in micro:
            n_rows, width = mb.input_ids_BT.shape
            assert width == int(row_lengths(mb).max())  # cut to its own longest row
            assert n_rows * width <= budget or n_rows == 1
            # Each row is the same row as in the batch (ids, masks, log-probs), minus padding.
            for r, sid in enumerate(mb.sample_ids):
                b = batch.sample_ids.index(sid)
                assert torch.equal(mb.input_ids_BT[r], batch.input_ids_BT[b, :width])
                assert torch.equal(mb.logp_teacher_BT[r], batch.logp_teacher_BT[b, :width])
                assert bool((batch.attention_mask_BT[b, width:] == 0).all())
        if budget == 1:
            assert len(micro) == len(LENGTHS)
        if budget == 1000:
            assert len(micro) == 1
    cells, padded = padding_cells([batch])
    assert (cells, padded) == (batch.input_ids_BT.numel(), cells - sum(lengths))
    # Sorting by length and cutting removes padding.
    assert padding_cells(plan_micro_batches(batch, 33))[1] < padded


def test_min_count_splits_until_equal_or_single_rows():
    batch = collate(scored(LENGTHS[:4]), pad_id=0)
    assert len(plan_micro_batches(batch, 1000)) == 1
    assert len(plan_micro_batches(batch, 1000, min_count=3)) == 3
    assert len(plan_micro_batches(batch, 1000, min_count=9)) == 4  # one row each, cannot split
    with pytest.raises(ValueError, match="token_budget"):
        plan_micro_batches(batch, -1)


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_micro_batch_losses_and_gradients_add_up(aggregation, temperature):
    model = tiny_llama()
    batch = collate(scored(LENGTHS, seed=1), pad_id=0)
    kw = {**DISTILL, "aggregation": aggregation, "temperature": temperature}
    kw.update(normaliser=global_normaliser(batch, aggregation))

    model.zero_grad()
    loss_full, stats_full = loss_of(model, batch, **kw)
    loss_full.backward()
    grads_full = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    micro = plan_micro_batches(batch, 20)
    assert len(micro) >= 3
    total, metrics = 0.0, []
    for mb in micro:
        loss, stats = loss_of(model, mb, **kw)
        loss.backward()
        total += loss.item()
        metrics.append(stats.metrics())
    assert total == pytest.approx(loss_full.item(), rel=1e-5)
    for g, p in zip(grads_full, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    merged, full = merge_metrics(metrics), stats_full.metrics()
    assert merged.keys() == full.keys()
    for key in full:
        assert merged[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key


# ----------------------------------------------------------------- DeepSpeed (slow)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LR = 1e-3


def _engine(model_dir, stage, rank, world, port, mb_tokens):
    from learner.engine import LearnerEngine

    return LearnerEngine(
        model_path=model_dir,
        optim=optim_settings(
            zero_stage=stage, lr=LR, precision="fp32", micro_batch_tokens=mb_tokens
        ),
        loss=loss_settings(temperature=0.8, **DISTILL),
        rank=rank,
        world_size=world,
        master_addr="127.0.0.1",
        master_port=port,
    )


def _rank_run(model_dir, rank, world, port, shard, normaliser, budget):
    """Every ZeRO stage: one step without and one with micro-batches (fresh engines)."""
    torch.set_num_threads(1)
    out = {}
    for stage in (1, 2, 3):
        for mb_tokens in (0, budget):
            engine = _engine(model_dir, stage, rank, world, port, mb_tokens)
            metrics = engine.train_step(shard, normaliser=normaliser)
            out[stage, mb_tokens] = (metrics, engine.export_weights())
    return out


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    path = tmp_path_factory.mktemp("student")
    tiny_llama().save_pretrained(path)
    return str(path)


# Rank 0's shard needs 3 micro-batches at this budget (three rows of 12 tokens); rank 1's fits in
# one, is split in two, and runs one zero-weight pass: the counts must match across ranks.
SHARDS = [[(3, 9), (2, 10), (4, 8)], [(2, 3), (1, 4)]]
BUDGET = 12


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_accumulated_step_equals_full_step_under_deepspeed(student, world):
    if world == 1:
        shards = [collate(scored(SHARDS[0] + SHARDS[1], seed=5), pad_id=0)]
    else:
        shards = [collate(scored(s, seed=5 + i), pad_id=0) for i, s in enumerate(SHARDS)]
    normaliser = sum(global_normaliser(s, "token_mean") for s in shards)
    port = free_port()
    with ProcessPoolExecutor(world, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(_rank_run, student, r, world, port, shards[r], normaliser, BUDGET)
            for r in range(world)
        ]
        results = [f.result(timeout=600) for f in futures]

    counts = [results[r][1, BUDGET][0]["learner/micro_batches"] for r in range(world)]
    assert counts == [len(SHARDS[0]) if world == 2 else 4] * world
    for stage in (1, 2, 3):
        full = merge_metrics([results[r][stage, 0][0] for r in range(world)])
        micro = merge_metrics([results[r][stage, BUDGET][0] for r in range(world)])
        assert full["learner/micro_batches"] == 1
        assert micro["learner/loss"] == pytest.approx(full["learner/loss"], rel=1e-5, abs=1e-7)
        assert micro["learner/grad_norm"] == pytest.approx(full["learner/grad_norm"], rel=1e-5)
        assert micro["learner/grad_norm"] > 0
        assert micro["learner/tokens"] == full["learner/tokens"]
        # Sorting rows by length and cutting each micro-batch removes padding (the 2-rank
        # shards have equal-length rows: none to remove).
        assert micro["learner/padding_frac"] <= full["learner/padding_frac"]
        assert (micro["learner/padding_frac"] < full["learner/padding_frac"]) == (world == 1)
        for key in ("distill/divergence", "distill/mismatch", "learner/sequences"):
            assert micro[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
        before = dict(LlamaForCausalLM.from_pretrained(student).named_parameters())
        weights_full = results[0][stage, 0][1]
        assert any(not torch.equal(t, before[n].detach()) for n, t in weights_full)
        for r in range(world):
            for (n, a), (_, b) in zip(results[r][stage, BUDGET][1], weights_full, strict=True):
                assert_same_adam_step(a, b, before[n].detach(), f"ZeRO-{stage} rank {r} {n}")


def assert_same_adam_step(after, ref_after, start, what):
    """Parameters after one AdamW step agree within 1e-5 wherever the step is determined.

    Adam's first update is −lr·g/(|g| + eps): for an entry with |g| ≲ eps = 1e-8 it is any value
    in (−lr, lr) depending on float noise in g (summation order), whatever the implementation.
    Entries whose update is at least lr/2 in both runs (|g| ≳ eps) must agree to 1e-5; the
    others may differ by up to 2·lr, and must be rare.
    """
    step, ref_step = after - start, ref_after - start
    determined = (step.abs() >= LR / 2) & (ref_step.abs() >= LR / 2)
    torch.testing.assert_close(
        after[determined], ref_after[determined], rtol=0, atol=1e-5, msg=lambda m: f"{what}: {m}"
    )
    assert (after - ref_after).abs().max() <= 2 * LR + 1e-7, what
    # (Entries with no gradient at all, e.g. embeddings of absent tokens, do not move in either.)
    assert (~determined & (after != ref_after)).float().mean() < 0.01, what
