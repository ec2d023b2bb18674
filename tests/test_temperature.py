"""The sampling temperature is part of the policy, and every component agrees on it.

Real vLLM (CPU) and the learner's own forward pass on the tiny model: at temperature τ = 0.7 the
sampler records log softmax(logits / τ) of the tokens it drew, the learner recomputes the same
(strictly on-policy: mismatch below 1e-4, importance weights 1), and the teacher scores at its
own temperature.
"""

import pytest
import torch
from learner_settings import loss_of
from transformers import AutoModelForCausalLM

from learner.batch import collate
from learner.logprobs import sampled_logprobs
from learner.step import global_normaliser
from rollout.records import Rollout, ScoredRollout

pytestmark = pytest.mark.slow

TAU = 0.7


@pytest.fixture(scope="module")
def engines(tiny_model):
    from rollout.engine import EngineSettings, StudentEngine, TeacherEngine

    base = dict(model_path=str(tiny_model), dtype="float32", seed=0, kv_cache_mb=64)
    student = StudentEngine(EngineSettings(**base))
    teacher = TeacherEngine(EngineSettings(**base, teacher_temperature=0.5))
    yield student, teacher
    student.close()
    teacher.close()


def sampled_rollouts(student):
    prompts = [[1, 5, 6, 7], [1, 9], [1, 12, 4, 8, 3]]
    gens = student.generate(prompts, max_tokens=24, temperature=TAU, n=2, seed=3)
    out = []
    for i, (prompt, per_prompt) in enumerate(zip(prompts, gens, strict=True)):
        for j, g in enumerate(per_prompt):
            rollout = Rollout(
                f"p{i}/{j}", f"p{i}", "", tuple(prompt), g.token_ids, g.logprobs, 0, g.finish_reason
            )
            out.append(ScoredRollout(rollout=rollout, logp_teacher=g.logprobs))
    return out


def test_learner_matches_the_sampler_at_the_sampling_temperature(tiny_model, engines):
    student, _ = engines
    scored = sampled_rollouts(student)
    batch = collate(scored, pad_id=0)
    assert batch.num_response_tokens > 50
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    mask_BT = batch.response_mask_BT != 0
    args = (batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT)
    with torch.no_grad():
        at_tau = sampled_logprobs(model, *args, temperature=TAU)
        at_one = sampled_logprobs(model, *args, temperature=1.0)
    mismatch = (at_tau - batch.logp_sampler_BT)[mask_BT].abs()
    assert mismatch.mean() < 1e-4 and mismatch.max() < 1e-3
    # The raw (temperature-1) log-probs are a different policy: the check has teeth.
    assert (at_one - batch.logp_sampler_BT)[mask_BT].abs().mean() > 1e-2

    # Through the learner's loss: strictly on-policy, the importance weights are 1.
    n = global_normaliser(batch, "token_mean")
    _, stats = loss_of(
        model, batch, divergence="js", estimator="opd_plus", discount=0.0, ratio_clip=10.0,
        is_cap=2.0, aggregation="token_mean", normaliser=n, temperature=TAU,
    )  # fmt: skip
    assert stats.mismatch < 1e-4
    assert stats.is_weight_mean == pytest.approx(1.0, abs=1e-4)
    assert stats.is_truncated_frac == 0.0
    _, naive = loss_of(
        model, batch, divergence="js", estimator="opd_plus", discount=0.0, ratio_clip=10.0,
        is_cap=2.0, aggregation="token_mean", normaliser=n, temperature=TAU,
        logprob_chunk_size=0,
    )  # fmt: skip
    assert naive.mismatch < 1e-4


def test_teacher_scores_at_its_own_temperature(tiny_model, engines):
    student, teacher = engines
    scored = sampled_rollouts(student)
    prompts = [list(s.rollout.prompt_ids) for s in scored]
    responses = [list(s.rollout.response_ids) for s in scored]
    got = [s.logp_teacher for s in teacher.score(prompts, responses)]
    batch = collate(scored, pad_id=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        want_BT = sampled_logprobs(
            model, batch.input_ids_BT, batch.attention_mask_BT, batch.response_mask_BT,
            temperature=0.5,
        )  # fmt: skip
    for b, (s, lps) in enumerate(zip(scored, got, strict=True)):
        P, R = len(s.rollout.prompt_ids), len(s.rollout.response_ids)
        torch.testing.assert_close(torch.tensor(lps), want_BT[b, P : P + R], rtol=0, atol=1e-4)
    # ... and not at the sampler's temperature.
    assert any(
        abs(a - b) > 1e-2 for s, lps in zip(scored, got, strict=True)
        for a, b in zip(lps, s.rollout.logp_sampler, strict=True)
    )  # fmt: skip
