"""learner.logprobs: chunked log-probs equal the naive full-logits path (values and gradients).

Reference: the model's full [B, T, V] logits in float64, divided by the temperature, through
`rollout.alignment.token_logprobs` (the one home of the off-by-one).
"""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from learner.logprobs import sampled_logprobs
from rollout.alignment import token_logprobs

VOCAB = 37  # odd, so that no chunk or vocabulary size divides anything


def tiny_llama(seed=0, tie=False):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tie,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    # Larger logits than the init's, so that the temperature visibly changes the distribution.
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


def padded_batch(seed=0):
    """Right-padded rows of uneven prompt / response lengths (one with an empty response)."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(2, 5), (4, 1), (1, 7), (3, 0), (2, 3)]
    T = max(p + r for p, r in lengths) + 1  # every row has at least one pad column
    B = len(lengths)
    ids_BT = torch.randint(0, VOCAB, (B, T), generator=g)
    attn_BT = torch.zeros(B, T, dtype=torch.long)
    resp_BT = torch.zeros(B, T)
    for b, (p, r) in enumerate(lengths):
        ids_BT[b, p + r :] = 0
        attn_BT[b, : p + r] = 1
        resp_BT[b, p : p + r] = 1.0
    return ids_BT, attn_BT, resp_BT


def naive(model, ids_BT, attn_BT, resp_BT, temperature, extra_BTK=None):
    """Full-vocabulary log-softmax of the model's logits / τ, in the logits' dtype (≥ float32)."""
    logits_BTV = model(input_ids=ids_BT, attention_mask=attn_BT, use_cache=False).logits
    logits_BTV = logits_BTV.to(torch.promote_types(logits_BTV.dtype, torch.float32)) / temperature
    logp_BTV = torch.log_softmax(logits_BTV[:, :-1], -1)  # row i−1 predicts token i
    logp_BT = torch.gather(logp_BTV, -1, ids_BT[:, 1:, None]).squeeze(-1)
    logp_BT = torch.nn.functional.pad(logp_BT, (1, 0)) * resp_BT.to(logp_BT.dtype)
    if extra_BTK is None:
        return logp_BT
    extra = torch.gather(logp_BTV, -1, extra_BTK[:, 1:])
    extra = torch.nn.functional.pad(extra, (0, 0, 1, 0)) * resp_BT[..., None].to(extra.dtype)
    return logp_BT, extra


def test_aligned_like_token_logprobs():
    """Same columns and values as rollout.alignment.token_logprobs on the response."""
    model = tiny_llama(seed=3)
    ids_BT, attn_BT, resp_BT = padded_batch(seed=1)
    with torch.no_grad():
        logits_BTV = model(input_ids=ids_BT, attention_mask=attn_BT).logits
        want_BT = token_logprobs(logits_BTV, ids_BT) * resp_BT
        got_BT = sampled_logprobs(model, ids_BT, attn_BT, resp_BT, chunk_size=4)
    torch.testing.assert_close(got_BT, want_BT, rtol=0, atol=1e-5)


def grads_of(model, scalar):
    model.zero_grad()
    scalar.backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1000])
@pytest.mark.parametrize("tie", [False, True])
def test_values_and_gradients_equal_the_naive_path(temperature, chunk_size, tie):
    model = tiny_llama(seed=1, tie=tie)
    ref = copy.deepcopy(model).double()
    ids_BT, attn_BT, resp_BT = padded_batch()
    coef_BT = torch.randn(resp_BT.shape, generator=torch.Generator().manual_seed(3))

    logp_BT = sampled_logprobs(
        model, ids_BT, attn_BT, resp_BT, temperature=temperature, chunk_size=chunk_size
    )
    want_BT = naive(ref, ids_BT, attn_BT, resp_BT, temperature)
    assert logp_BT.dtype == torch.float32 and logp_BT.shape == ids_BT.shape
    assert bool((logp_BT[resp_BT == 0] == 0).all()) and bool((logp_BT[resp_BT != 0] < 0).all())
    torch.testing.assert_close(logp_BT.double(), want_BT, rtol=0, atol=2e-5)

    got = grads_of(model, (coef_BT * logp_BT).sum())
    want = grads_of(ref, (coef_BT.double() * want_BT).sum())
    for (name, _), g, w in zip(model.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_float64_is_exact(temperature):
    """In float64 the chunked path is the naive path up to rounding (1e-12)."""
    model = tiny_llama(seed=2).double()
    ids_BT, attn_BT, resp_BT = padded_batch(seed=4)
    coef_BT = torch.randn(resp_BT.shape, dtype=torch.float64)
    logp_BT = sampled_logprobs(
        model, ids_BT, attn_BT, resp_BT, temperature=temperature, chunk_size=3
    )
    want_BT = naive(model, ids_BT, attn_BT, resp_BT, temperature)
    assert logp_BT.dtype == torch.float64
    torch.testing.assert_close(logp_BT, want_BT, rtol=0, atol=1e-12)
    got = grads_of(model, (coef_BT * logp_BT).sum())
    want = grads_of(model, (coef_BT * want_BT).sum())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_temperature_changes_the_values():
    model = tiny_llama(seed=1)
    ids_BT, attn_BT, resp_BT = padded_batch()
    at_1 = sampled_logprobs(model, ids_BT, attn_BT, resp_BT, temperature=1.0)
    at_07 = sampled_logprobs(model, ids_BT, attn_BT, resp_BT, temperature=0.7)
    assert (at_1 - at_07).abs().max() > 0.1


@pytest.mark.parametrize("chunk_size", [2, 64])
def test_extra_ids_share_the_pass(chunk_size):
    """The dense hook: log-probs at [B, T, K] ids, values and gradients, with the sampled ones."""
    model = tiny_llama(seed=5, tie=True)
    ref = copy.deepcopy(model).double()
    ids_BT, attn_BT, resp_BT = padded_batch(seed=6)
    g = torch.Generator().manual_seed(7)
    extra_BTK = torch.randint(0, VOCAB, (*ids_BT.shape, 3), generator=g)
    extra_BTK[..., 0] = ids_BT  # a candidate equal to the sampled token
    coef_BT = torch.randn(resp_BT.shape, generator=g)
    coef_BTK = torch.randn(extra_BTK.shape, generator=g)

    logp_BT, logp_BTK = sampled_logprobs(
        model, ids_BT, attn_BT, resp_BT, temperature=0.8, chunk_size=chunk_size,
        extra_ids_BTK=extra_BTK,
    )  # fmt: skip
    want_BT, want_BTK = naive(ref, ids_BT, attn_BT, resp_BT, 0.8, extra_BTK)
    assert logp_BTK.shape == extra_BTK.shape
    torch.testing.assert_close(logp_BT.double(), want_BT, rtol=0, atol=2e-5)
    torch.testing.assert_close(logp_BTK.double(), want_BTK, rtol=0, atol=2e-5)
    torch.testing.assert_close(logp_BTK[..., 0], logp_BT)

    got = grads_of(model, (coef_BT * logp_BT).sum() + (coef_BTK * logp_BTK).sum())
    want = grads_of(ref, (coef_BT.double() * want_BT).sum() + (coef_BTK.double() * want_BTK).sum())
    for (name, _), a, b in zip(model.named_parameters(), got, want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_model_matches_its_own_naive_path():
    model = tiny_llama(seed=8).to(torch.bfloat16)
    ids_BT, attn_BT, resp_BT = padded_batch()
    logp_BT = sampled_logprobs(model, ids_BT, attn_BT, resp_BT, temperature=0.7, chunk_size=4)
    assert logp_BT.dtype == torch.float32
    want_BT = naive(model, ids_BT, attn_BT, resp_BT, 0.7).float()
    torch.testing.assert_close(logp_BT, want_BT, rtol=0, atol=1e-5)


def test_no_response_positions_and_bad_input():
    model = tiny_llama()
    ids_BT, attn_BT, resp_BT = padded_batch()
    empty = sampled_logprobs(model, ids_BT, attn_BT, torch.zeros_like(resp_BT))
    assert torch.equal(empty, torch.zeros_like(empty))
    bad = resp_BT.clone()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match="column 0"):
        sampled_logprobs(model, ids_BT, attn_BT, bad)
    with pytest.raises(ValueError, match="temperature"):
        sampled_logprobs(model, ids_BT, attn_BT, resp_BT, temperature=0.0)
    with pytest.raises(ValueError, match="positions_BT"):
        sampled_logprobs(model, ids_BT, attn_BT, resp_BT[:, :-1])
