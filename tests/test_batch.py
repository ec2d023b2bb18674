"""The learner's padded batch: hand-checked alignment, and collate/split round trips."""

import dataclasses

import pytest
import torch

from learner.batch import TrainBatch, collate, split
from rollout.alignment import token_logprobs
from rollout.records import Rollout, ScoredRollout


def scored(sid, prompt, response, sampler, teacher, version=0):
    rollout = Rollout(
        sample_id=sid,
        problem_id=sid.split("/")[0],
        answer="",
        prompt_ids=tuple(prompt),
        response_ids=tuple(response),
        logp_sampler=tuple(sampler),
        policy_version=version,
        finish_reason="stop",
    )
    return ScoredRollout(rollout=rollout, logp_teacher=tuple(teacher))


def two_samples():
    a = scored("a/0", [5, 6, 7], [8, 9], [-0.1, -0.2], [-1.1, -1.2], version=3)
    b = scored("b/0", [5], [10, 11, 12], [-0.3, -0.4, -0.5], [-1.3, -1.4, -1.5], version=2)
    return [a, b]


def test_collate_alignment_by_hand():
    batch = collate(two_samples(), pad_id=0)
    # Row a: prompt 5 6 7 | response 8 9.  Row b: prompt 5 | response 10 11 12 | pad.
    assert batch.input_ids_BT.tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, 0]]
    assert batch.attention_mask_BT.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch.response_mask_BT.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 0]]
    z = 0.0
    expect_sampler = [[z, z, z, -0.1, -0.2], [z, -0.3, -0.4, -0.5, z]]
    expect_teacher = [[z, z, z, -1.1, -1.2], [z, -1.3, -1.4, -1.5, z]]
    torch.testing.assert_close(batch.logp_sampler_BT, torch.tensor(expect_sampler))
    torch.testing.assert_close(batch.logp_teacher_BT, torch.tensor(expect_teacher))
    assert batch.versions_B.tolist() == [3, 2]
    assert batch.sample_ids == ("a/0", "b/0")
    assert batch.num_response_tokens == 5
    assert batch.input_ids_BT.dtype == torch.int64
    assert batch.response_mask_BT.dtype == torch.float32


def test_response_columns_hold_the_learner_logprob_of_the_response_token():
    """Column i of token_logprobs is log softmax(logits[i-1])[x_i]: the response columns of the
    mask pick exactly the log-probs of the response tokens, like vLLM's prompt_logprobs."""
    batch = collate(two_samples(), pad_id=0)
    logits_BTV = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    logp_BT = token_logprobs(logits_BTV, batch.input_ids_BT)
    logsm = torch.log_softmax(logits_BTV, -1)
    # Row a, response tokens 8 (column 3, predicted at 2) and 9 (column 4, predicted at 3).
    assert logp_BT[0, 3] == pytest.approx(logsm[0, 2, 8].item(), abs=1e-6)
    assert logp_BT[0, 4] == pytest.approx(logsm[0, 3, 9].item(), abs=1e-6)
    # Row b, response 10 11 12 at columns 1 2 3, predicted at 0 1 2.
    for col, tok in zip((1, 2, 3), (10, 11, 12), strict=True):
        assert logp_BT[1, col] == pytest.approx(logsm[1, col - 1, tok].item(), abs=1e-6)


def random_scored(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, R = 1 + i % 4, i % 5  # includes an empty response
        ids = torch.randint(0, 32, (P + R,), generator=g).tolist()
        lp = (-torch.rand(2 * R, generator=g)).tolist()
        out.append(scored(f"p{i}/0", ids[:P], ids[P:], lp[:R], lp[R:], version=i % 3))
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_split_round_trip(n):
    batch = collate(random_scored(7), pad_id=1)
    shards = split(batch, n)
    assert len(shards) == n
    sizes = [s.num_sequences for s in shards]
    assert sum(sizes) == 7 and max(sizes) - min(sizes) <= 1
    assert sum((s.sample_ids for s in shards), ()) == batch.sample_ids
    for name in ("input_ids_BT", "attention_mask_BT", "response_mask_BT", "logp_teacher_BT",
                 "logp_sampler_BT", "versions_B"):  # fmt: skip
        joined = torch.cat([getattr(s, name) for s in shards])
        assert torch.equal(joined, getattr(batch, name)), name
    # Shards own their storage (a pickled view would carry the whole batch).
    for s in shards:
        assert s.input_ids_BT.untyped_storage().nbytes() == s.input_ids_BT.numel() * 8


def test_split_needs_a_row_per_shard():
    batch = collate(random_scored(2), pad_id=0)
    with pytest.raises(ValueError, match="non-empty"):
        split(batch, 3)


def test_collate_rejects_empty_and_batch_checks_shapes():
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_id=0)
    batch = collate(two_samples(), pad_id=0)
    with pytest.raises(ValueError, match="logp_teacher_BT"):
        TrainBatch(
            input_ids_BT=batch.input_ids_BT,
            attention_mask_BT=batch.attention_mask_BT,
            response_mask_BT=batch.response_mask_BT,
            logp_teacher_BT=batch.logp_teacher_BT[:, :-1],
            logp_sampler_BT=batch.logp_sampler_BT,
            versions_B=batch.versions_B,
            sample_ids=batch.sample_ids,
        )


def _with_topk(batch, k=2):
    B, T = batch.input_ids_BT.shape
    return dataclasses.replace(
        batch,
        teacher_topk_ids_BTK=torch.arange(B * T * k).reshape(B, T, k),
        teacher_topk_logp_BTK=-torch.rand(B, T, k),
    )


@pytest.mark.parametrize("topk", [False, True], ids=["sampled", "topk"])
def test_to_device_moves_every_tensor(topk):
    """A move to the ``meta`` device (a real device change, no copy of values) reaches every
    tensor field, listed from the dataclass so a new field is covered too, and keeps each
    one's shape and dtype; the source batch stays where it was."""
    batch = collate(two_samples(), pad_id=0)
    batch = _with_topk(batch) if topk else batch
    moved = batch.to("meta")
    for f in dataclasses.fields(TrainBatch):
        old, new = getattr(batch, f.name), getattr(moved, f.name)
        if isinstance(old, torch.Tensor):
            assert new.device.type == "meta", f.name
            assert (new.shape, new.dtype) == (old.shape, old.dtype), f.name
            assert old.device.type == "cpu", f.name
        else:
            assert new == old, f.name
    assert moved.topk == batch.topk == (2 if topk else 0)
