"""Brute force over every sequence of a tiny tabular student (docs/math.md §9).

Vocabulary 3, length 3: 27 sequences, 13 prefixes (states), one softmax per prefix. J(θ) and
∇J are exact (enumeration + autograd); the estimator's exact expectation is
Σ_y sg(P_θ(y)) · ∇ surrogate(y), with the surrogate the real `surrogate_loss` (w ≡ 1).
"""

import pytest
import torch
from divergence_cases import registry_divergences, shifted
from enumeration import sequence_space

from learner.advantages import token_advantages
from learner.divergences import Divergence, get_divergence
from learner.loss import surrogate_loss

V, L = 3, 3
SPACE = sequence_space(V, L)
SEQS, PREFIXES = SPACE.seqs, SPACE.prefixes
STATE_BT, TOKEN_BT = SPACE.state_BT, SPACE.token_BT
PREFIX_STATE_PT, PREFIX_TOKEN_PT = SPACE.prefix_state_PT, SPACE.prefix_token_PT
PREFIX_MASK_PT = SPACE.prefix_mask_PT

DIVS = registry_divergences()
BIASED_UNDER_OPD = ["forward_kl", "js", "hellinger", "tv", "pearson", "neyman", "jeffreys"]


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(student logits with grad, teacher logits), each [num_prefixes, V], float64."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(len(PREFIXES), V, generator=gen, dtype=torch.float64)
    teacher = 1.5 * torch.randn(len(PREFIXES), V, generator=gen, dtype=torch.float64)
    return student.requires_grad_(), teacher


def _token_logps(logits: torch.Tensor) -> torch.Tensor:
    """[27, L] log-prob of each sequence's token at each position."""
    logp_SV = logits.log_softmax(-1)
    return logp_SV[STATE_BT, TOKEN_BT]


def _prefix_probs(theta: torch.Tensor) -> torch.Tensor:
    """[num_prefixes] probability that the student reaches each prefix."""
    logp_SV = theta.log_softmax(-1)
    return (logp_SV[PREFIX_STATE_PT, PREFIX_TOKEN_PT] * PREFIX_MASK_PT).sum(-1).exp()


def _state_divergences(theta: torch.Tensor, teacher: torch.Tensor, div: Divergence):
    """[num_prefixes] D_f(π_θ(·|s) ‖ π_T(·|s)) = Σ_v π_T(v) f(π_θ(v)/π_T(v)), via f only."""
    p, q = theta.softmax(-1), teacher.softmax(-1)
    return (q * div.f(p / q)).sum(-1)


def exact_objective(theta, teacher, div):
    """J(θ) = Σ_t E_{s_t}[D_f(π_θ(·|s_t) ‖ π_T(·|s_t))] = E_y[Σ_t g(r_t)]."""
    return (_prefix_probs(theta) * _state_divergences(theta, teacher, div)).sum()


def exact_gradient(theta, teacher, div):
    (grad,) = torch.autograd.grad(exact_objective(theta, teacher, div), theta)
    return grad


def frozen_state_gradient(theta, teacher, div):
    """Σ_t E_{s_t}[∇ D_f(π_θ(·|s_t) ‖ π_T(·|s_t))] with the state distribution detached."""
    objective = (_prefix_probs(theta).detach() * _state_divergences(theta, teacher, div)).sum()
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def expected_estimator(theta, teacher, div, *, estimator, discount, pad=False, center=False):
    """Σ_y sg(P_θ(y)) · ∇[−Σ_t A_t log π_θ(y_t|s_t)], through the production code."""
    logp_BT, logp_teacher_BT = _token_logps(theta), _token_logps(teacher)
    mask_BT = torch.ones_like(logp_BT)
    if pad:
        # A masked "prompt" column in front and garbage right padding must change nothing.
        garbage = torch.full((len(SEQS), 1), float("nan"), dtype=torch.float64)
        logp_BT = torch.cat([garbage.nan_to_num(-3.0), logp_BT, garbage.nan_to_num(-1e30)], 1)
        logp_teacher_BT = torch.cat([garbage, logp_teacher_BT, garbage.nan_to_num(-torch.inf)], 1)
        mask_BT = torch.cat([garbage.zero_(), mask_BT, garbage], 1)
    adv_BT = token_advantages(
        logp_BT.detach(),
        logp_teacher_BT,
        mask_BT,
        divergence=div,
        estimator=estimator,
        discount=discount,
        ratio_clip=None,
        center_cost=center,
    )
    seq_prob_B = logp_BT.detach().nan_to_num(0.0).mul(mask_BT).sum(-1).exp()
    # Weighting the advantages by sg(P(y)) and normalising by 1 turns the batch sum into the
    # exact expectation over sequences.
    loss, _ = surrogate_loss(
        logp_BT,
        adv_BT * seq_prob_B[:, None],
        logp_BT.detach(),
        mask_BT,
        is_cap=None,
        normaliser=1.0,
    )
    (grad,) = torch.autograd.grad(loss, theta)
    return grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_objective_two_ways(div):
    theta, teacher = _tables(0)
    per_sequence = (
        _token_logps(theta).sum(-1).exp()
        * div.cost(_token_logps(theta) - _token_logps(teacher)).sum(-1)
    ).sum()
    torch.testing.assert_close(
        per_sequence, exact_objective(theta, teacher, div), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_opd_plus_full_discount_is_exact_gradient(div, seed):
    theta, teacher = _tables(seed)
    est = expected_estimator(theta, teacher, div, estimator="opd_plus", discount=1.0)
    assert rel_err(est, exact_gradient(theta, teacher, div)) < 1e-8


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_masked_positions_change_nothing(div):
    theta, teacher = _tables(2)
    for discount in (0.0, 1.0):
        padded = expected_estimator(
            theta, teacher, div, estimator="opd_plus", discount=discount, pad=True
        )
        plain = expected_estimator(theta, teacher, div, estimator="opd_plus", discount=discount)
        assert rel_err(padded, plain) < 1e-12


def test_opd_full_discount_is_exact_for_reverse_kl():
    theta, teacher = _tables(0)
    div = get_divergence("reverse_kl")
    est = expected_estimator(theta, teacher, div, estimator="opd", discount=1.0)
    assert rel_err(est, exact_gradient(theta, teacher, div)) < 1e-8


@pytest.mark.parametrize("name", BIASED_UNDER_OPD)
def test_opd_full_discount_is_biased(name):
    theta, teacher = _tables(0)
    div = get_divergence(name)
    est = expected_estimator(theta, teacher, div, estimator="opd", discount=1.0)
    assert rel_err(est, exact_gradient(theta, teacher, div)) > 1e-2


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_opd_plus_zero_discount_is_frozen_state_gradient(div):
    theta, teacher = _tables(1)
    est = expected_estimator(theta, teacher, div, estimator="opd_plus", discount=0.0)
    assert rel_err(est, frozen_state_gradient(theta, teacher, div)) < 1e-8


@pytest.mark.parametrize("name", ["forward_kl", "js", "hellinger", "pearson"])
def test_opd_zero_discount_is_biased_per_state(name):
    theta, teacher = _tables(1)
    div = get_divergence(name)
    est = expected_estimator(theta, teacher, div, estimator="opd", discount=0.0)
    assert rel_err(est, frozen_state_gradient(theta, teacher, div)) > 1e-2


@pytest.mark.parametrize("discount", [0.0, 1.0])
@pytest.mark.parametrize("name", ["forward_kl", "js", "hellinger", "jeffreys"])
def test_generator_shift_moves_opd_but_not_opd_plus(name, discount):
    theta, teacher = _tables(3)
    base = get_divergence(name)
    moved = shifted(base, 0.8)

    def est(div, estimator):
        return expected_estimator(theta, teacher, div, estimator=estimator, discount=discount)

    assert rel_err(est(moved, "opd_plus"), est(base, "opd_plus")) < 1e-10
    assert rel_err(est(moved, "opd"), est(base, "opd")) > 1e-2


@pytest.mark.parametrize("estimator", ["opd_plus", "opd"])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_student_equal_to_teacher_has_zero_expected_gradient(div, estimator):
    theta, _ = _tables(4)
    teacher = theta.detach().clone()
    for discount in (0.0, 0.5, 1.0):
        est = expected_estimator(theta, teacher, div, estimator=estimator, discount=discount)
        assert est.abs().max().item() < 1e-12


@pytest.mark.parametrize("discount", [0.0, 1.0])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_centred_opd_plus_has_the_same_expectation(div, discount):
    """Centring subtracts the constant f'(1) from the immediate cost: same expected gradient."""
    theta, teacher = _tables(5)
    plain = expected_estimator(theta, teacher, div, estimator="opd_plus", discount=discount)
    centred = expected_estimator(
        theta, teacher, div, estimator="opd_plus", discount=discount, center=True
    )
    assert rel_err(centred, plain) < 1e-10
