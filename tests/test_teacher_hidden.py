"""TeacherHiddenEngine: vLLM's pooling runner hands back the teacher's final hidden states
(after the final norm, no projection, no normalisation) at the positions that predict the
response tokens; the teacher's output layer on them gives TeacherEngine.score's log-probs."""

from __future__ import annotations

import pytest
import torch

from rollout.alignment import response_positions

pytestmark = pytest.mark.slow

K = 8


def sequences(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """Six (prompt, response) pairs of mixed lengths, one with a one-token prompt."""
    g = torch.Generator().manual_seed(0)
    prompts, responses = [[1]], [torch.randint(3, vocab, (9,), generator=g).tolist()]
    for i in range(5):
        prompts.append([1, *torch.randint(3, vocab, (2 + i,), generator=g).tolist()])
        responses.append(torch.randint(3, vocab, (4 + 2 * i,), generator=g).tolist())
    return prompts, responses


def test_hidden_states_are_the_final_norm_output_and_give_the_teacher_logprobs(tiny_model):
    from transformers import AutoModelForCausalLM

    from rollout.engine import EngineSettings, TeacherEngine, TeacherHiddenEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts, responses = sequences(model.config.vocab_size)
    base = dict(model_path=str(tiny_model), dtype="float32", kv_cache_mb=64, max_model_len=64)
    # max_num_seqs=2: the six sequences take three engine steps, so a later step must not
    # overwrite the rows handed back for an earlier one.
    hidden_engine = TeacherHiddenEngine(EngineSettings(**base, max_num_seqs=2))
    teacher = TeacherEngine(EngineSettings(**base, teacher_topk=K))
    try:
        states = hidden_engine.hidden_states(prompts, responses)
        scores = teacher.score(prompts, responses)
        vocab = teacher.vocab_size
    finally:
        hidden_engine.close()
        teacher.close()

    assert len(states) == len(prompts)
    for p, r, h_RH, score in zip(prompts, responses, states, scores, strict=True):
        assert h_RH.shape == (len(r), model.config.hidden_size)
        assert h_RH.dtype == torch.float32 and h_RH.device.type == "cpu"
        assert h_RH.is_contiguous()
        assert h_RH.untyped_storage().nbytes() == h_RH.numel() * h_RH.element_size()

        ids = torch.tensor([p + r])
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
            last_TH = out.hidden_states[-1][0]
            # transformers' last hidden state is the final norm's output: lm_head of it is
            # the model's logits (utils/output_capturing.py ties hidden_states[-1]).
            torch.testing.assert_close(model.lm_head(last_TH), out.logits[0])
            span = response_positions(len(p), len(r))
            ref_RH = last_TH[span.start - 1 : span.stop - 1]
            torch.testing.assert_close(h_RH, ref_RH, rtol=1e-5, atol=2e-5)

            # The learner's computation: the teacher's output layer, sliced to the tokenizer's
            # ids as the engines slice their logits, then log-softmax in float32.
            logp_RV = model.lm_head(h_RH)[:, :vocab].float().log_softmax(-1)
        sampled = logp_RV.gather(-1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(sampled, torch.tensor(score.logp_teacher), rtol=0, atol=1e-4)
        top_ids = torch.tensor(score.topk_ids)
        torch.testing.assert_close(
            logp_RV.gather(-1, top_ids), torch.tensor(score.topk_logp), rtol=0, atol=1e-4
        )
        torch.testing.assert_close(logp_RV.topk(K, -1).values, torch.tensor(score.topk_logp))
