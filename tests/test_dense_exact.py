"""Brute-force proofs for dense OPD+ over the teacher's top-K (docs/math.md §8).

A tabular autoregressive student (vocabulary 4, length 3: 64 sequences, 21 prefixes, one softmax
per prefix) and a random teacher. S(s) = the teacher's top-K tokens at each prefix. By
enumeration, for every divergence in the registry:

- J~(θ) = Σ_s P_θ(reach s) · D~(s) and ∇J~ exactly (autograd);
- the estimator's exact expectation Σ_y sg(P_θ(y)) · ∇ surrogate(y), with the surrogate the real
  `dense_surrogate_loss` (w ≡ 1), equals ∇J~ at γ = 1 for K = 2 and K = V, equals ∇J (the true
  divergence objective) when K = V, and equals the frozen-state gradient at γ = 0.
"""

import pytest
import torch
from divergence_cases import registry_divergences
from enumeration import sequence_space

from learner import divergences as divergences_module
from learner.dense import (
    dense_surrogate_loss,
    restricted_divergence,
    topk_token_logprobs,
)
from learner.divergences import DIVERGENCES, Divergence, divergence_names

V, L = 4, 3
SPACE = sequence_space(V, L)
SEQS, PREFIXES = SPACE.seqs, SPACE.prefixes
STATE_BT, TOKEN_BT = SPACE.state_BT, SPACE.token_BT
PREFIX_STATE_PT, PREFIX_TOKEN_PT = SPACE.prefix_state_PT, SPACE.prefix_token_PT
PREFIX_MASK_PT = SPACE.prefix_mask_PT

# Every divergence the registry offers; parametric families at a few parameters. A new
# parametric family without parameters here fails `test_every_registry_name_is_covered`.
PARAMS = {"alpha": [{"alpha": 0.5}, {"alpha": 2.0}, {"alpha": -1.0}]}
DIVS = registry_divergences(PARAMS)
KS = [2, V]


def test_every_registry_name_is_covered():
    covered = {d.name for d in DIVS}
    for name in divergence_names():
        if name in DIVERGENCES:
            assert name in covered
        else:
            assert name in PARAMS, f"parametric divergence {name!r} has no test parameters"
    assert set(PARAMS) <= set(divergences_module._PARAMETRIC)


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits with grad, teacher logits), each [num_prefixes, V], float64."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(len(PREFIXES), V, generator=gen, dtype=torch.float64)
    teacher = 1.5 * torch.randn(len(PREFIXES), V, generator=gen, dtype=torch.float64)
    return student.requires_grad_(), teacher


def _support(teacher: torch.Tensor, k: int) -> torch.Tensor:
    """[num_prefixes, k] the teacher's top-k token ids per prefix (a function of the state)."""
    return teacher.topk(k, dim=-1).indices


def _prefix_probs(theta: torch.Tensor) -> torch.Tensor:
    logp_SV = theta.log_softmax(-1)
    return (logp_SV[PREFIX_STATE_PT, PREFIX_TOKEN_PT] * PREFIX_MASK_PT).sum(-1).exp()


def _restricted_by_f(theta, teacher, div: Divergence, k: int) -> torch.Tensor:
    """[num_prefixes] D~ = Σ_j Q~_j f(P~_j/Q~_j) from probabilities and f (not the code's g)."""
    ids = _support(teacher, k)
    p, q = theta.softmax(-1), teacher.softmax(-1)
    p_S, q_S = p.gather(-1, ids), q.gather(-1, ids)
    p_J = torch.cat([p_S, (1 - p_S.sum(-1, keepdim=True))], -1)
    q_J = torch.cat([q_S, (1 - q_S.sum(-1, keepdim=True))], -1)
    if k == V:  # both tails are 0 (up to round-off): the bucket does not exist
        p_J, q_J = p_S, q_S
    return (q_J * div.f(p_J / q_J)).sum(-1)


def _full_by_f(theta, teacher, div: Divergence) -> torch.Tensor:
    p, q = theta.softmax(-1), teacher.softmax(-1)
    return (q * div.f(p / q)).sum(-1)


def _grad(objective, theta):
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def restricted_gradient(theta, teacher, div, k):
    """∇J~, J~ = Σ_s P_θ(s) D~(s)."""
    return _grad((_prefix_probs(theta) * _restricted_by_f(theta, teacher, div, k)).sum(), theta)


def restricted_frozen_gradient(theta, teacher, div, k):
    """Σ_s sg(P_θ(s)) ∇D~(s): the state distribution held fixed."""
    objective = (_prefix_probs(theta).detach() * _restricted_by_f(theta, teacher, div, k)).sum()
    return _grad(objective, theta)


def true_gradient(theta, teacher, div):
    """∇J, J = Σ_s P_θ(s) D_f(π_θ(·|s) ‖ π_T(·|s))."""
    return _grad((_prefix_probs(theta) * _full_by_f(theta, teacher, div)).sum(), theta)


def true_frozen_gradient(theta, teacher, div):
    objective = (_prefix_probs(theta).detach() * _full_by_f(theta, teacher, div)).sum()
    return _grad(objective, theta)


def _batch_inputs(theta, teacher, k):
    """Per-sequence inputs of `dense_surrogate_loss` for all 64 sequences: [64, L, k] and [64, L]."""
    ids_SK = _support(teacher, k)
    logp_student_SV, logp_teacher_SV = theta.log_softmax(-1), teacher.log_softmax(-1)
    ids_BTK = ids_SK[STATE_BT]
    logp_student_BTK = logp_student_SV[STATE_BT.unsqueeze(-1), ids_BTK]
    logp_teacher_BTK = logp_teacher_SV[STATE_BT.unsqueeze(-1), ids_BTK]
    logp_learner_BT = logp_student_SV[STATE_BT, TOKEN_BT]
    return logp_student_BTK, logp_teacher_BTK, logp_learner_BT


def expected_estimator(theta, teacher, div, *, k, discount, drop=None, pad=False):
    """Σ_y sg(P_θ(y)) · ∇ dense_surrogate_loss(y), each sequence a batch of one (normaliser 1).

    drop="direct" / "future" builds a deliberately broken variant (the loss minus that term),
    to show that both terms are needed.
    """
    logp_s_BTK, logp_t_BTK, logp_learner_BT = _batch_inputs(theta, teacher, k)
    mask_BT = torch.ones_like(logp_learner_BT)
    if pad:
        # A masked prompt column in front and garbage padding behind must change nothing.
        def padded(x, front, back):
            shape = (x.shape[0], 1, *x.shape[2:])
            return torch.cat([x.new_full(shape, front), x, x.new_full(shape, back)], 1)

        logp_s_BTK = padded(logp_s_BTK, 0.0, float("nan"))
        logp_t_BTK = padded(logp_t_BTK, float("nan"), 0.0)
        logp_learner_BT = padded(logp_learner_BT, -3.0, -1e30)
        mask_BT = padded(mask_BT, 0.0, 0.0)
    seq_prob_B = torch.where(mask_BT != 0, logp_learner_BT.detach(), 0.0).sum(-1).exp()
    total = 0.0
    for b in range(len(SEQS)):
        rows = slice(b, b + 1)
        loss, _ = dense_surrogate_loss(
            logp_s_BTK[rows],
            logp_t_BTK[rows],
            logp_learner_BT[rows],
            logp_learner_BT[rows].detach(),
            mask_BT[rows],
            divergence=div,
            discount=discount,
            ratio_clip=None,
            is_cap=None,
            normaliser=1.0,
        )
        if drop is not None:
            d_T, _ = restricted_divergence(
                logp_s_BTK[b], logp_t_BTK[b], divergence=div, ratio_clip=None
            )
            direct = d_T.sum()
            loss = loss - direct if drop == "direct" else direct
        total = total + seq_prob_B[b] * loss
    return _grad(total, theta)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_restricted_divergence_matches_f_form(div, k):
    """The code's D~ (P~·g in ell form, log-space tail) equals Σ Q~ f(P~/Q~)."""
    theta, teacher = _tables(0)
    ids = _support(teacher, k)
    d, clamped = restricted_divergence(
        theta.log_softmax(-1).gather(-1, ids),
        teacher.log_softmax(-1).gather(-1, ids),
        divergence=div,
        ratio_clip=None,
    )
    torch.testing.assert_close(d, _restricted_by_f(theta, teacher, div, k), rtol=1e-10, atol=1e-14)
    assert not clamped.any()


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_restricted_divergence_is_exact_at_full_support_and_a_lower_bound_below(div):
    theta, teacher = _tables(1)
    full = _full_by_f(theta, teacher, div)
    for k in range(1, V + 1):
        ids = _support(teacher, k)
        d, _ = restricted_divergence(
            theta.log_softmax(-1).gather(-1, ids),
            teacher.log_softmax(-1).gather(-1, ids),
            divergence=div,
            ratio_clip=None,
        )
        if k >= V - 1:  # a tail of at most one token loses nothing
            torch.testing.assert_close(d, full, rtol=1e-10, atol=1e-14)
        else:
            assert (d <= full + 1e-12).all()
            assert (d < full - 1e-6).any()  # strict somewhere: a merged tail hides something


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_full_discount_is_exact_gradient_of_restricted_objective(div, k, seed):
    theta, teacher = _tables(seed)
    est = expected_estimator(theta, teacher, div, k=k, discount=1.0)
    assert rel_err(est, restricted_gradient(theta, teacher, div, k)) < 1e-8


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_full_support_full_discount_is_true_gradient(div):
    theta, teacher = _tables(2)
    est = expected_estimator(theta, teacher, div, k=V, discount=1.0)
    assert rel_err(est, true_gradient(theta, teacher, div)) < 1e-8


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_zero_discount_is_frozen_state_gradient(div, k):
    theta, teacher = _tables(3)
    est = expected_estimator(theta, teacher, div, k=k, discount=0.0)
    assert rel_err(est, restricted_frozen_gradient(theta, teacher, div, k)) < 1e-8
    if k == V:
        assert rel_err(est, true_frozen_gradient(theta, teacher, div)) < 1e-8


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_dropping_either_term_is_biased(div, k):
    """Both terms carry weight: without the direct term, or with only it, ∇J~ is missed."""
    theta, teacher = _tables(0)
    exact = restricted_gradient(theta, teacher, div, k)
    for drop in ("direct", "future"):
        est = expected_estimator(theta, teacher, div, k=k, discount=1.0, drop=drop)
        assert rel_err(est, exact) > 1e-2, drop


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_masked_positions_change_nothing(div):
    theta, teacher = _tables(4)
    for discount in (0.0, 1.0):
        padded = expected_estimator(theta, teacher, div, k=2, discount=discount, pad=True)
        plain = expected_estimator(theta, teacher, div, k=2, discount=discount)
        assert rel_err(padded, plain) < 1e-12


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_student_equal_to_teacher_has_zero_expected_gradient(div):
    theta, _ = _tables(5)
    teacher = theta.detach().clone()
    for k in KS:
        for discount in (0.0, 1.0):
            est = expected_estimator(theta, teacher, div, k=k, discount=discount)
            assert est.abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_tail_numerics_when_top_k_covers_almost_everything(div, dtype):
    """Teacher top-K holding all but ~1e-13 of the mass, or all of it with round-off past 1."""
    vocab, k = 64, 8
    gen = torch.Generator().manual_seed(7)
    teacher = torch.randn(3, vocab, generator=gen, dtype=torch.float64)
    teacher[:, :k] += 40.0  # top-8 covers all but ~e^-40 of the mass
    student = torch.randn(3, vocab, generator=gen, dtype=torch.float64)
    student[1, :k] += 40.0  # the student too, on one row
    ids = teacher.topk(k, -1).indices
    logp_t = teacher.log_softmax(-1).gather(-1, ids).to(dtype)
    logp_t[2] += 1e-6  # round-off: the reported top-K sums past 1
    theta = student.to(dtype).requires_grad_()
    d, _ = restricted_divergence(
        theta.log_softmax(-1).gather(-1, ids), logp_t, divergence=div, ratio_clip=10.0
    )
    (grad,) = torch.autograd.grad(d.sum(), theta)
    assert torch.isfinite(d).all() and torch.isfinite(grad).all()
    assert (d >= -1e-6).all()
    # Row 1: both sides hold (almost) everything on S and agree up to their top-K shapes: finite
    # and equal to the divergence of the renormalised top-K distributions up to the tiny tails.
    p_S = student[1].softmax(-1)[ids[1]]
    q_S = teacher[1].softmax(-1)[ids[1]]
    ref = (q_S * div.f(p_S / q_S)).sum().to(dtype)
    torch.testing.assert_close(d[1].detach(), ref, rtol=1e-3, atol=1e-5)


def test_topk_token_logprobs_matches_full_log_softmax_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    B, T, Vb, K = 3, 7, 50, 5
    logits = torch.randn(B, T, Vb, generator=gen, dtype=torch.float64).requires_grad_()
    ids = torch.randint(0, Vb, (B, T, K), generator=gen)
    ids[0, 2, 1] = ids[0, 2, 0]  # a duplicate id must accumulate its gradient
    got = topk_token_logprobs(logits, ids, chunk=3)
    ref_full = logits.float().log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:])
    ref = torch.nn.functional.pad(ref_full, (0, 0, 1, 0))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32
    weights = torch.randn(B, T, K, generator=gen)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-5, atol=1e-6)
    assert g_got.dtype == logits.dtype and g_got[:, -1].abs().max() == 0


def test_topk_token_logprobs_rejects_ids_outside_the_vocabulary():
    logits = torch.zeros(1, 3, 10)
    with pytest.raises(ValueError, match="vocabulary of 10"):
        topk_token_logprobs(logits, torch.full((1, 3, 2), 10))
