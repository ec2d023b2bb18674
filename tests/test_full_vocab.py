"""Full-vocabulary OPD+ from the teacher's hidden states (`distill.teacher_topk = "full"`;
docs/math.md §8 "The full vocabulary").

(a) Brute force, float64, every registry divergence: a tabular student (vocabulary 4, length 3:
    64 sequences, 21 prefixes) and a random teacher given as hidden states through an output
    layer. The expectation Σ_y sg(P_θ(y)) ∇loss(y) of the real `full_vocab_divergence` +
    `full_dense_surrogate_loss` equals ∇J (J = E[Σ_t D_f(π_θ(·|s_t) ‖ π_T(·|s_t))], the true
    objective, no tail bucket) at γ = 1 and the frozen-state gradient at γ = 0; dropping either
    term misses it (the negative control).
(b) The chunked pass (chunk sizes dividing the length or not) on a real batch (the tiny model as
    teacher, its own hidden states) equals an unchunked float64 reference: the top-K code at
    K = V and D_f in its f form, loss and every parameter's gradient.
(c) The output layer read from a folder's safetensors (untied, tied, sharded, padded) gives
    `AutoModelForCausalLM.from_pretrained(folder).lm_head`'s log-probs; what is missing is named.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from divergence_cases import registry_divergences
from enumeration import sequence_space
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from learner.batch import TrainBatch
from learner.dense import (
    dense_surrogate_loss,
    full_dense_surrogate_loss,
    full_divergence,
    full_vocab_divergence,
    full_vocab_terms,
    head_log_softmax,
)
from learner.divergences import get_divergence
from learner.logprobs import final_hidden_states
from learner.teacher_head import (
    FULL_CHUNK_DIVISOR,
    TeacherHead,
    full_batch_loss,
    load_teacher_head,
    teacher_fields,
)
from services.errors import UserError

V, L = 4, 3
SPACE = sequence_space(V, L)
SEQS, PREFIXES = SPACE.seqs, SPACE.prefixes
STATE_BT, TOKEN_BT = SPACE.state_BT, SPACE.token_BT
DIVS = registry_divergences({"alpha": [{"alpha": 0.5}, {"alpha": 2.0}, {"alpha": -1.0}]})
EYE = torch.eye(V, dtype=torch.float64)


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits with grad, teacher logits), each [num_prefixes, V], float64."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(len(PREFIXES), V, generator=gen, dtype=torch.float64)
    teacher = 1.5 * torch.randn(len(PREFIXES), V, generator=gen, dtype=torch.float64)
    return student.requires_grad_(), teacher


def _prefix_probs(theta: torch.Tensor) -> torch.Tensor:
    logp_SV = theta.log_softmax(-1)
    picked = logp_SV[SPACE.prefix_state_PT, SPACE.prefix_token_PT]
    return (picked * SPACE.prefix_mask_PT).sum(-1).exp()


def _d_f(theta, teacher, div) -> torch.Tensor:
    """[num_prefixes] D_f = Σ_v q f(p/q) from probabilities and f (not the code's g)."""
    p, q = theta.softmax(-1), teacher.softmax(-1)
    return (q * div.f(p / q)).sum(-1)


def _grad(objective, theta):
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def true_gradient(theta, teacher, div):
    return _grad((_prefix_probs(theta) * _d_f(theta, teacher, div)).sum(), theta)


def frozen_gradient(theta, teacher, div):
    return _grad((_prefix_probs(theta).detach() * _d_f(theta, teacher, div)).sum(), theta)


def expected_estimator(theta, teacher, div, *, discount, path="hidden", drop=None, pad=False):
    """Σ_y sg(P_θ(y)) · ∇loss(y) through the real chunked divergence and the real two-term loss.

    All 64 sequences form one batch (normaliser 1); the loss is linear in d_BT (the direct term
    and A_t both), so passing d_BT · sg(P_θ(y)) weights each sequence's loss by its probability.
    The divergence runs over the 64 · L states in chunks of 5 (not a divisor).
    path "hidden": the tabular logits are the student's hidden states through an identity
    output layer; "logits": passed as logits. The teacher is always hidden states + a layer.
    drop = "direct" / "future": the loss minus that term (deliberately broken).
    """
    B = len(SEQS)
    states_N = STATE_BT.reshape(-1)
    kw = {"student_weight_VH": EYE} if path == "hidden" else {}
    d_N, _ = full_vocab_divergence(
        theta[states_N], teacher[states_N], EYE, divergence=div, ratio_clip=None, chunk=5, **kw
    )
    logp_BT = theta.log_softmax(-1)[STATE_BT, TOKEN_BT]
    seq_prob_B1 = logp_BT.detach().sum(-1, keepdim=True).exp()
    d_BT = d_N.reshape(B, L) * seq_prob_B1
    mask_BT = torch.ones(B, L, dtype=torch.float64)
    if pad:  # a masked prompt column in front and garbage behind change nothing
        nan = torch.full((B, 1), float("nan"), dtype=torch.float64)
        d_BT = torch.cat([nan, d_BT, nan], 1)
        logp_BT = torch.cat([nan.nan_to_num(-3.0), logp_BT, nan.nan_to_num(-1e30)], 1)
        mask_BT = torch.cat([nan.nan_to_num(0.0), mask_BT, nan.nan_to_num(0.0)], 1)
    loss, _ = full_dense_surrogate_loss(
        d_BT, logp_BT, logp_BT.detach(), mask_BT, discount=discount, is_cap=None, normaliser=1.0
    )
    direct = (d_N.reshape(B, L) * seq_prob_B1).sum()
    if drop == "direct":
        loss = loss - direct
    elif drop == "future":
        loss = direct
    return _grad(loss, theta)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------- (a) the estimator is exact


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_full_divergence_is_d_f(div):
    """The code's D (Σ p·g in ell form, chunked) equals Σ q f(p/q) at every prefix."""
    theta, teacher = _tables(0)
    want = _d_f(theta, teacher, div)
    ref, _ = full_divergence(
        theta.log_softmax(-1), teacher.log_softmax(-1), divergence=div, ratio_clip=None
    )
    torch.testing.assert_close(ref, want, rtol=1e-10, atol=1e-14)
    for chunk in (1, 4, 100):
        d, clamped = full_vocab_divergence(
            theta, teacher, EYE, divergence=div, ratio_clip=None, chunk=chunk
        )
        torch.testing.assert_close(d, want, rtol=1e-10, atol=1e-14)
        assert (clamped == 0).all()


@pytest.mark.parametrize("seed, path", [(0, "hidden"), (1, "logits")])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_full_discount_is_the_true_gradient(div, seed, path):
    theta, teacher = _tables(seed)
    est = expected_estimator(theta, teacher, div, discount=1.0, path=path)
    assert rel_err(est, true_gradient(theta, teacher, div)) < 1e-8


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_zero_discount_is_the_frozen_state_gradient(div):
    theta, teacher = _tables(3)
    est = expected_estimator(theta, teacher, div, discount=0.0)
    assert rel_err(est, frozen_gradient(theta, teacher, div)) < 1e-8


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_dropping_either_term_is_biased(div):
    """The negative control: the same enumeration with either term left out misses ∇J."""
    theta, teacher = _tables(0)
    exact = true_gradient(theta, teacher, div)
    for drop in ("direct", "future"):
        est = expected_estimator(theta, teacher, div, discount=1.0, drop=drop)
        assert rel_err(est, exact) > 1e-2, drop


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_masked_positions_change_nothing_and_equal_student_gives_zero(div):
    theta, teacher = _tables(4)
    padded = expected_estimator(theta, teacher, div, discount=1.0, pad=True)
    plain = expected_estimator(theta, teacher, div, discount=1.0)
    assert rel_err(padded, plain) < 1e-12
    same = expected_estimator(theta, theta.detach().clone(), div, discount=0.5)
    assert same.abs().max().item() < 1e-12


@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_chunked_gradient_equals_autograd_of_the_reference(div, clip):
    """The written-out backward (a − p·Σa)/τ, into hidden states and the output layer, equals
    autograd through `full_divergence` on the unchunked log-softmax, clamped or not, τ ≠ 1;
    so does it with the sampled tokens' log-probs taken from the same chunks."""
    g = torch.Generator().manual_seed(11)
    N, H, Vb = 7, 5, 13
    h = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(Vb, H, generator=g, dtype=torch.float64).requires_grad_()
    h_t = torch.randn(N, 6, generator=g, dtype=torch.float64)
    w_t = 2 * torch.randn(Vb, 6, generator=g, dtype=torch.float64)
    up = torch.randn(N, generator=g, dtype=torch.float64)
    up_logp = torch.randn(N, generator=g, dtype=torch.float64)
    targets = torch.randint(0, Vb, (N,), generator=g)
    logp_s = (h @ w.t() / 0.7).log_softmax(-1)
    ref, clamped_ref = full_divergence(
        logp_s, (h_t @ w_t.t() / 1.3).log_softmax(-1), divergence=div, ratio_clip=clip
    )
    ref_logp = logp_s.gather(1, targets[:, None])[:, 0]
    ref_grads = torch.autograd.grad((ref * up).sum(), [h, w], retain_graph=True)
    ref_both = torch.autograd.grad((ref * up + ref_logp * up_logp).sum(), [h, w])
    if clip is not None:
        assert clamped_ref.any() and not clamped_ref.all()
    for chunk in (1, 3, 7, 50):
        d, clamped = full_vocab_divergence(
            h,
            h_t,
            w_t,
            divergence=div,
            student_weight_VH=w,
            temperature=0.7,
            teacher_temperature=1.3,
            ratio_clip=clip,
            chunk=chunk,
        )
        torch.testing.assert_close(d, ref, rtol=1e-10, atol=1e-12)
        assert clamped.tolist() == clamped_ref.sum(-1).tolist()
        grads = torch.autograd.grad((d * up).sum(), [h, w])
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
        # With the sampled tokens' log-probs from the same chunks (one ∂W accumulation).
        d2, logp, _ = full_vocab_terms(
            h,
            h_t,
            w_t,
            divergence=div,
            targets_N=targets,
            student_weight_VH=w,
            temperature=0.7,
            teacher_temperature=1.3,
            ratio_clip=clip,
            chunk=chunk,
        )
        torch.testing.assert_close(logp, ref_logp, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad((d2 * up + logp * up_logp).sum(), [h, w])
        for got, want in zip(grads, ref_both, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_shapes_and_vocabularies_must_agree():
    h, w = torch.zeros(3, 4), torch.zeros(10, 4)
    with pytest.raises(ValueError, match="10 entries and the teacher's output layer 12 rows"):
        full_vocab_divergence(h, h, torch.zeros(12, 4), divergence="js", student_weight_VH=w)
    with pytest.raises(ValueError, match="3 student positions and 2 teacher"):
        full_vocab_divergence(h, h[:2], w, divergence="js", student_weight_VH=w)


# ------------------------------------------------- (b) chunked = unchunked on a real batch


def _student(seed: int, config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def _shifted_hidden(model, ids_BT, mask_BT) -> torch.Tensor:
    """[B, T, H] with column i = the model's final hidden state at i − 1 (predicts x_i)."""
    with torch.no_grad():
        h_BTH = final_hidden_states(model, ids_BT, mask_BT)
    return torch.nn.functional.pad(h_BTH[:, :-1], (0, 0, 1, 0))


@pytest.fixture(scope="module")
def real_batch(tiny_model):
    """The tiny model as teacher: sequences it samples after random prompts (ragged, padded),
    its hidden states at the response columns, a random student of the same shape."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    V = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    rows, T = [], 0
    torch.manual_seed(0)
    for i in range(5):
        prompt = torch.randint(3, V, (2 + i % 3,), generator=g)
        with torch.no_grad():
            out = teacher.generate(
                prompt[None], max_new_tokens=4 + i, min_new_tokens=4 + i, do_sample=True
            )[0]
        rows.append((len(prompt), out))
        T = max(T, len(out))
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    attn, resp = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T)
    for b, (P, out) in enumerate(rows):
        ids[b, : len(out)], attn[b, : len(out)], resp[b, P : len(out)] = out, 1, 1.0
    logp_sampler = (-1.5 + 0.3 * torch.randn(B, T, generator=g)) * resp
    batch = TrainBatch(
        input_ids_BT=ids,
        attention_mask_BT=attn,
        response_mask_BT=resp,
        logp_teacher_BT=torch.zeros(B, T),
        logp_sampler_BT=logp_sampler,
        versions_B=torch.zeros(B, dtype=torch.long),
        sample_ids=tuple(f"s{b}" for b in range(B)),
    )
    hidden = _shifted_hidden(teacher, ids, attn) * resp[..., None]
    head = load_teacher_head(tiny_model)
    return teacher, _student(1, teacher.config), batch, hidden, head


KW = dict(discount=1.0, ratio_clip=10.0, is_cap=2.0, temperature=0.8, teacher_temperature=1.2)


def _reference(student64, batch, hidden64, w64, div, aggregation, normaliser):
    """Unchunked float64: full [B, T, V] log-softmaxes, D through the top-K code at K = V."""
    logits = student64(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
    logp_s = torch.nn.functional.pad(
        (logits[:, :-1] / KW["temperature"]).log_softmax(-1), (0, 0, 1, 0)
    )
    logp_t = (hidden64 @ w64.t() / KW["teacher_temperature"]).log_softmax(-1)
    logp_learner = logp_s.gather(-1, batch.input_ids_BT[..., None])[..., 0]
    loss, stats = dense_surrogate_loss(
        logp_s,
        logp_t,
        logp_learner,
        batch.logp_sampler_BT.double(),
        batch.response_mask_BT,
        divergence=div,
        discount=KW["discount"],
        ratio_clip=KW["ratio_clip"],
        is_cap=KW["is_cap"],
        aggregation=aggregation,
        normaliser=normaliser,
    )
    # D_f in its f form, independent of both codes' g.
    p, q = logp_s.exp(), logp_t.exp()
    d_f = (q * get_divergence(div).f(p / q)).sum(-1) * batch.response_mask_BT
    return loss, stats, d_f


@pytest.mark.parametrize(
    "div, aggregation",
    [("js", "token_mean"), ("forward_kl", "seq_mean"), ("reverse_kl", "token_mean")],
)
def test_chunked_pass_equals_the_unchunked_float64_reference(real_batch, div, aggregation):
    teacher, student, batch, hidden, head = real_batch
    mask = batch.response_mask_BT
    n = float(mask.sum()) if aggregation == "token_mean" else float((mask.sum(-1) > 0).sum())
    student64 = _student(1, teacher.config).double()
    w64 = head.weight_VH.double()
    ref, ref_stats, d_f = _reference(student64, batch, hidden.double(), w64, div, aggregation, n)
    ref_grads = torch.autograd.grad(ref, list(student64.parameters()))
    assert int(mask.sum()) == 30
    deviations = {}
    for model, head_, hid, tol in (
        (student64, TeacherHead(w64, head.folder, head.key, head.rows), hidden.double(), 1e-10),
        (student, head, hidden, 2e-5),
    ):
        # N = 30 positions in chunks of 1, 3 (divides), 7 (does not), 50 (one chunk).
        for chunk in (n * FULL_CHUNK_DIVISOR for n in (1, 3, 7, 50)):
            loss, logp_BT, stats = full_batch_loss(
                model,
                batch,
                hid,
                head_,
                divergence=div,
                aggregation=aggregation,
                normaliser=n,
                chunk_size=chunk,
                **KW,
            )
            grads = torch.autograd.grad(loss, list(model.parameters()))
            torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
            assert stats.divergence == pytest.approx(ref_stats.divergence, rel=tol)
            assert stats.divergence == pytest.approx(
                float(d_f.detach().sum() / mask.sum()), rel=tol
            )
            worst = 0.0
            for got, want in zip(grads, ref_grads, strict=True):
                torch.testing.assert_close(got.double(), want, rtol=tol * 10, atol=tol)
                worst = max(worst, ((got.double() - want).abs().max() / want.abs().max()).item())
            assert worst < tol  # measured: ≤ 1e-15 in float64, ≤ 1.2e-6 in float32
            deviations[(str(model.dtype), chunk)] = (abs(loss.item() - ref.item()), worst)
    print(f"\n{div} {aggregation} (|Δloss|, max |Δgrad|/max |grad|):", deviations)


def test_padding_rows_of_the_student_take_no_part(real_batch):
    """A student whose output layer has 12 large random padding rows beyond the tokenizer's 20
    ids: the same loss and gradients as without them (docs/math.md §6), padding rows get none."""
    teacher, student, batch, hidden, head = real_batch
    padded = _student(1, teacher.config)
    padded.resize_token_embeddings(32, mean_resizing=False)
    with torch.no_grad():
        for weight in {padded.lm_head.weight, padded.get_input_embeddings().weight}:
            weight[20:] = 10 * weight[:20].std() * torch.randn(12, weight.shape[1])
    kw = dict(divergence="js", aggregation="token_mean", normaliser=30.0, chunk_size=64, **KW)
    losses, grads = [], []
    for model in (student, padded):
        loss, _, _ = full_batch_loss(model, batch, hidden, head, **kw)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for g_pad, g in zip(grads[1], grads[0], strict=True):
        if g_pad.shape != g.shape:  # the output layer / embedding: padding rows get nothing
            assert (g_pad[20:] == 0).all()
            g_pad = g_pad[:20]
        torch.testing.assert_close(g_pad, g, rtol=1e-5, atol=1e-7)


def test_teacher_fields_from_hidden_states(real_batch):
    """The sampled log-prob and the top-K (K = V: no cap) from the hidden states equal the
    teacher model's own log-softmax at the response columns, zero elsewhere."""
    teacher, _, batch, hidden, head = real_batch
    V = head.vocab_size
    with torch.no_grad():
        logits = teacher(
            input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT
        ).logits
    logp_BTV = torch.nn.functional.pad(logits[:, :-1].log_softmax(-1), (0, 0, 1, 0))
    mask = batch.response_mask_BT
    for topk, chunk in ((3, 2), (V, 5)):
        got = teacher_fields(head, batch.input_ids_BT, mask, hidden, topk=topk, chunk=chunk)
        want = logp_BTV.gather(-1, batch.input_ids_BT[..., None])[..., 0] * mask
        torch.testing.assert_close(got["logp_teacher_BT"], want, rtol=0, atol=1e-5)
        top = logp_BTV.topk(topk, -1)
        keep = mask.bool()
        assert (got["teacher_topk_ids_BTK"][keep] == top.indices[keep]).all()
        torch.testing.assert_close(
            got["teacher_topk_logp_BTK"][keep], top.values[keep], rtol=0, atol=1e-5
        )
        assert got["teacher_topk_logp_BTK"][~keep].abs().sum() == 0


# --------------------------------------------------------- (c) the head read from the folder


def _tiny_config(**changes) -> LlamaConfig:
    base = dict(
        vocab_size=20,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaConfig(**{**base, **changes})


def _check_head(folder, *, vocab_size=None):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    head = load_teacher_head(folder, vocab_size=vocab_size)
    V = vocab_size or model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, model.config.hidden_size, generator=g)
    with torch.no_grad():
        want = model.lm_head(h)[:, :V].log_softmax(-1)
    got = head_log_softmax(h, head.weight_VH)
    assert head.vocab_size == V and head.rows == model.config.vocab_size
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    return head


def test_head_from_the_tiny_models_folder_equals_its_lm_head(tiny_model):
    head = _check_head(tiny_model)
    assert head.key == "lm_head.weight"


def test_tied_sharded_and_padded_heads(tmp_path):
    torch.manual_seed(0)
    tied = LlamaForCausalLM(_tiny_config(tie_word_embeddings=True))
    tied.save_pretrained(tmp_path / "tied")
    assert _check_head(tmp_path / "tied").key == "model.embed_tokens.weight"

    torch.manual_seed(1)
    sharded = LlamaForCausalLM(_tiny_config(num_hidden_layers=2))
    sharded.save_pretrained(tmp_path / "sharded", max_shard_size="8KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert _check_head(tmp_path / "sharded").key == "lm_head.weight"

    # Padded: 32 rows, the extra 12 large and random; the tokenizer's 20 ids are the real rows.
    torch.manual_seed(2)
    padded = LlamaForCausalLM(_tiny_config(vocab_size=32))
    with torch.no_grad():
        padded.lm_head.weight[20:] = 50 * torch.randn(12, 16)
    padded.save_pretrained(tmp_path / "padded")
    head = _check_head(tmp_path / "padded", vocab_size=20)
    assert head.rows == 32
    every_row = load_teacher_head(tmp_path / "padded")  # the rule broken: padding rows kept
    h = torch.randn(4, 16)
    assert head_log_softmax(h, every_row.weight_VH)[:, :20].exp().sum(-1).max() < 0.5


def test_missing_heads_are_named(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'none'}.*no config.json"):
        load_teacher_head(tmp_path / "none")
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config())
    model.save_pretrained(tmp_path / "untied")
    # An untied config whose weights lack the head: the folder and the key are named.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "untied" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "untied" / "model.safetensors")
    with pytest.raises(UserError, match=f"{tmp_path / 'untied'}.*'lm_head.weight'"):
        load_teacher_head(tmp_path / "untied")
    (tmp_path / "untied" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="neither model.safetensors nor"):
        load_teacher_head(tmp_path / "untied")
    model.save_pretrained(tmp_path / "small")
    with pytest.raises(UserError, match="has 20 rows, fewer than the tokenizer's 21 ids"):
        load_teacher_head(tmp_path / "small", vocab_size=21)
    assert math.isfinite(load_teacher_head(tmp_path / "small").weight_VH.sum().item())
