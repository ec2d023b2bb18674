"""Brute force over every episode of a tiny tool-using student (docs/math.md §10).

An episode interleaves the student's turns and an environment's answers. Here, over a
vocabulary of 3 tokens: the student writes a first turn of 2 tokens; if it ends in `CALL` (a
"tool call") a stochastic environment answers 2 tokens drawn from its own seeded table
E(·|history), and the student writes a second turn of 2 tokens; otherwise the episode ends.
That is 3·3 + 3·3·3·3·3 − 3 = 249 episodes, padded to length 6, exactly enumerated.

A tabular student and teacher have one softmax per prefix (environment prefixes included: a
language model assigns log-probs to the environment's tokens too, and the teacher scores the
whole trajectory). The objective counts the student's tokens only,

    J(θ) = E_{τ ~ (π_θ, E)}[ Σ_{t ∈ student} g(r_t) ] = Σ_{s student state} P_θ(s) · D_f(s),

with P_θ(s) the probability of reaching s, through both policies (E has no θ). The estimator's
exact expectation Σ_τ sg(P(τ)) · ∇ surrogate(τ) uses the real `token_advantages` /
`surrogate_loss` / `dense_surrogate_loss` with the student mask, and must equal ∇J at γ = 1 and
the frozen-state gradient at γ = 0, for every registry divergence; the same loss treating the
environment's tokens as the student's (no student mask) must not.
"""

import itertools

import pytest
import torch
from divergence_cases import registry_divergences

from learner.advantages import (
    discounted_future_sum,
    token_advantages,
    token_advantages_with_stats,
)
from learner.dense import dense_surrogate_loss
from learner.divergences import Divergence
from learner.loss import surrogate_loss

V = 3
ROLES = "SSEESS"  # who writes position t of an episode that goes on: Student / Environment
CALL = 0  # a first turn whose last token is CALL calls the tool
L = len(ROLES)
DIVS = registry_divergences()
K = 1  # the dense form's teacher top-K: with V = 3 the tail bucket merges two tokens


def _episodes() -> list[tuple[int, ...]]:
    out = []
    for a1 in itertools.product(range(V), repeat=2):
        if a1[-1] != CALL:
            out.append(a1)
            continue
        for rest in itertools.product(range(V), repeat=4):  # o1 (2 tokens), a2 (2 tokens)
            out.append(a1 + rest)
    return out


EPISODES = _episodes()
PREFIXES = sorted({ep[:t] for ep in EPISODES for t in range(len(ep))}, key=lambda p: (len(p), p))
PREFIX_ID = {p: i for i, p in enumerate(PREFIXES)}
STUDENT_STATES = [i for i, p in enumerate(PREFIXES) if ROLES[len(p)] == "S"]
ENV_STATES = [i for i, p in enumerate(PREFIXES) if ROLES[len(p)] == "E"]

# Per episode b and position t: the state (prefix id) before the token, the token, whether the
# position exists and whether the student wrote it. Padding reads state 0, token 0.
STATE_BT = torch.tensor(
    [[PREFIX_ID[ep[:t]] if t < len(ep) else 0 for t in range(L)] for ep in EPISODES]
)
TOKEN_BT = torch.tensor([list(ep) + [0] * (L - len(ep)) for ep in EPISODES])
VALID_BT = torch.tensor([[t < len(ep) for t in range(L)] for ep in EPISODES])
STUDENT_BT = VALID_BT & torch.tensor([c == "S" for c in ROLES])
# The same for prefixes (the states' own histories), padded to length L − 1.
PREFIX_STATE_PT = torch.tensor(
    [[PREFIX_ID[p[:t]] if t < len(p) else 0 for t in range(L - 1)] for p in PREFIXES]
)
PREFIX_TOKEN_PT = torch.tensor([list(p) + [0] * (L - 1 - len(p)) for p in PREFIXES])
PREFIX_VALID_PT = torch.tensor([[t < len(p) for t in range(L - 1)] for p in PREFIXES])
PREFIX_STUDENT_PT = PREFIX_VALID_PT & torch.tensor([c == "S" for c in ROLES[:-1]])


def _tables(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student logits with grad, teacher logits, environment log-probs), each [prefixes, V]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(PREFIXES), V)
    student = torch.randn(shape, generator=gen, dtype=torch.float64)
    teacher = 1.5 * torch.randn(shape, generator=gen, dtype=torch.float64)
    environment = (2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)).log_softmax(-1)
    return student.requires_grad_(), teacher, environment


def _reach_probs(theta: torch.Tensor, env_logp: torch.Tensor) -> torch.Tensor:
    """[prefixes] P(reach prefix): student factors at student positions, E's elsewhere."""
    own_PT = theta.log_softmax(-1)[PREFIX_STATE_PT, PREFIX_TOKEN_PT]
    env_PT = env_logp[PREFIX_STATE_PT, PREFIX_TOKEN_PT]
    logp_PT = torch.where(PREFIX_STUDENT_PT, own_PT, torch.where(PREFIX_VALID_PT, env_PT, 0.0))
    return logp_PT.sum(-1).exp()


def _episode_probs(theta: torch.Tensor, env_logp: torch.Tensor) -> torch.Tensor:
    """[episodes] P(τ), detached."""
    own_BT = theta.detach().log_softmax(-1)[STATE_BT, TOKEN_BT]
    env_BT = env_logp[STATE_BT, TOKEN_BT]
    logp_BT = torch.where(STUDENT_BT, own_BT, torch.where(VALID_BT, env_BT, 0.0))
    return logp_BT.sum(-1).exp()


def _state_divergences(theta, teacher, div: Divergence) -> torch.Tensor:
    """[prefixes] D_f(π_θ(·|s) ‖ π_T(·|s)) = Σ_v π_T(v) f(π_θ(v)/π_T(v)), via f only."""
    p, q = theta.softmax(-1), teacher.softmax(-1)
    return (q * div.f(p / q)).sum(-1)


def _restricted_divergences(theta, teacher, div: Divergence) -> torch.Tensor:
    """[prefixes] D~ over the teacher's top-K and one tail bucket, Σ_j Q~_j f(P~_j / Q~_j)."""
    ids = teacher.topk(K, dim=-1).indices
    p_S, q_S = theta.softmax(-1).gather(-1, ids), teacher.softmax(-1).gather(-1, ids)
    p_J = torch.cat([p_S, 1 - p_S.sum(-1, keepdim=True)], -1)
    q_J = torch.cat([q_S, 1 - q_S.sum(-1, keepdim=True)], -1)
    return (q_J * div.f(p_J / q_J)).sum(-1)


def _grad(objective, theta):
    (grad,) = torch.autograd.grad(objective, theta)
    return grad


def exact_gradient(theta, teacher, env_logp, per_state, *, frozen=False):
    """∇ Σ_{s student} P(s) · D(s); frozen: the reach probabilities detached."""
    reach = _reach_probs(theta, env_logp)
    if frozen:
        reach = reach.detach()
    states = torch.tensor(STUDENT_STATES)
    return _grad((reach[states] * per_state[states]).sum(), theta)


def _logps(theta, teacher):
    """Student (with grad) and teacher log-probs of every episode's tokens, [episodes, L]; the
    padding holds garbage that must change nothing."""
    own_BT = theta.log_softmax(-1)[STATE_BT, TOKEN_BT]
    teacher_BT = teacher.log_softmax(-1)[STATE_BT, TOKEN_BT]
    own_BT = torch.where(VALID_BT, own_BT, -1e30)
    teacher_BT = torch.where(VALID_BT, teacher_BT, float("nan"))
    return own_BT, teacher_BT


def sampled_estimator(theta, teacher, env_logp, div, *, discount, student_mask=True):
    """Σ_τ sg(P(τ)) · ∇[−Σ_t A_t log π_θ(y_t|s_t)] through the production code.

    student_mask=False is the broken variant: the environment's tokens treated as the
    student's (they get costs and score terms).
    """
    logp_BT, logp_teacher_BT = _logps(theta, teacher)
    mask_BT = VALID_BT.double()
    student_BT = STUDENT_BT.double() if student_mask else None
    adv_BT = token_advantages(
        logp_BT.detach(),
        logp_teacher_BT,
        mask_BT,
        divergence=div,
        discount=discount,
        ratio_clip=None,
        student_mask_BT=student_BT,
    )
    # Weighting the advantages by sg(P(τ)) with normaliser 1 makes the batch sum the expectation.
    loss, _ = surrogate_loss(
        logp_BT,
        adv_BT * _episode_probs(theta, env_logp)[:, None],
        logp_BT.detach(),
        mask_BT,
        is_cap=None,
        normaliser=1.0,
        student_mask_BT=student_BT,
    )
    return _grad(loss, theta)


def _grad_scaled(x: torch.Tensor, w_B: torch.Tensor) -> torch.Tensor:
    """x unchanged in value (bit for bit), its gradient in row b multiplied by w_B[b]."""
    w = w_B.view(-1, *[1] * (x.dim() - 1))
    return x.detach() + w * (x - x.detach())


def dense_estimator(theta, teacher, env_logp, div, *, discount, student_mask=True):
    """Σ_τ sg(P(τ)) · ∇ dense_surrogate_loss(τ): every episode in one batch (normaliser 1),
    row b's inputs scaled by P(τ_b) in the backward pass only, so the loss sees the episode's
    own values and its gradient is weighted by the episode's probability."""
    ids_BTK = teacher.topk(K, dim=-1).indices[STATE_BT]
    probs_B = _episode_probs(theta, env_logp)
    logp_s_BTK = theta.log_softmax(-1)[STATE_BT.unsqueeze(-1), ids_BTK]
    logp_t_BTK = teacher.log_softmax(-1)[STATE_BT.unsqueeze(-1), ids_BTK]
    logp_BT, _ = _logps(theta, teacher)
    loss, _ = dense_surrogate_loss(
        _grad_scaled(logp_s_BTK, probs_B),
        logp_t_BTK,
        _grad_scaled(logp_BT, probs_B),
        logp_BT.detach(),
        VALID_BT.double(),
        divergence=div,
        discount=discount,
        ratio_clip=None,
        is_cap=None,
        normaliser=1.0,
        student_mask_BT=STUDENT_BT.double() if student_mask else None,
    )
    return _grad(loss, theta)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_space():
    assert len(EPISODES) == 249
    assert int(STUDENT_BT.sum()) == 243 * 4 + 6 * 2
    theta, _, env_logp = _tables(0)
    torch.testing.assert_close(_episode_probs(theta, env_logp).sum().item(), 1.0)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_full_discount_is_exact_gradient(div, seed):
    theta, teacher, env_logp = _tables(seed)
    exact = exact_gradient(theta, teacher, env_logp, _state_divergences(theta, teacher, div))
    est = sampled_estimator(theta, teacher, env_logp, div, discount=1.0)
    assert rel_err(est, exact) < 1e-12


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_zero_discount_is_frozen_state_gradient(div):
    theta, teacher, env_logp = _tables(2)
    per_state = _state_divergences(theta, teacher, div)
    frozen = exact_gradient(theta, teacher, env_logp, per_state, frozen=True)
    est = sampled_estimator(theta, teacher, env_logp, div, discount=0.0)
    assert rel_err(est, frozen) < 1e-12


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_environment_tokens_as_student_tokens_is_biased(div):
    """The negative control: the same loss without the student mask misses ∇J (and the
    frozen-state gradient) by far more than the estimator's round-off."""
    theta, teacher, env_logp = _tables(1)
    for discount, frozen in ((1.0, False), (0.0, True)):
        per_state = _state_divergences(theta, teacher, div)
        exact = exact_gradient(theta, teacher, env_logp, per_state, frozen=frozen)
        wrong = sampled_estimator(
            theta, teacher, env_logp, div, discount=discount, student_mask=False
        )
        assert rel_err(wrong, exact) > 0.1, discount
        # θ's rows at the environment's states are never used by J: their exact gradient is
        # 0, and the broken loss moves them (score terms at the environment's tokens).
        assert exact[ENV_STATES].abs().max() == 0
        assert wrong[ENV_STATES].norm() > 0.1 * exact.norm()


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_dense_is_exact_and_frozen(div):
    theta, teacher, env_logp = _tables(3)
    for discount, frozen in ((1.0, False), (0.0, True)):
        per_state = _restricted_divergences(theta, teacher, div)
        exact = exact_gradient(theta, teacher, env_logp, per_state, frozen=frozen)
        est = dense_estimator(theta, teacher, env_logp, div, discount=discount)
        assert rel_err(est, exact) < 1e-12, discount


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.name)
def test_dense_with_environment_tokens_as_student_tokens_is_biased(div):
    theta, teacher, env_logp = _tables(1)
    for discount, frozen in ((1.0, False), (0.0, True)):
        per_state = _restricted_divergences(theta, teacher, div)
        exact = exact_gradient(theta, teacher, env_logp, per_state, frozen=frozen)
        wrong = dense_estimator(
            theta, teacher, env_logp, div, discount=discount, student_mask=False
        )
        assert rel_err(wrong, exact) > 0.1, discount


# ----------------------------------------------------------------- γ counts the student's tokens


def _interleaved(seed: int, B: int = 4, T: int = 12):
    """Random values, a response mask with a prompt in front and padding behind, and a
    student mask with environment spans inside: [B, T] each."""
    gen = torch.Generator().manual_seed(seed)
    x_BT = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask_BT = torch.zeros(B, T)
    mask_BT[:, 1 : T - 2] = 1
    student_BT = mask_BT * (torch.rand(B, T, generator=gen) > 0.4)
    return x_BT, mask_BT, student_BT


def _compact(x_BT: torch.Tensor, keep_BT: torch.Tensor) -> list[torch.Tensor]:
    return [row[k] for row, k in zip(x_BT, keep_BT.bool(), strict=True)]


@pytest.mark.parametrize("discount", [0.3, 0.8])
def test_discount_skips_environment_tokens(discount):
    """An episode's advantages at its student tokens are those of the student's tokens alone,
    the environment's spans cut out; counting positions instead (no student mask) is not."""
    logp_s_BT, mask_BT, student_BT = _interleaved(0)
    logp_t_BT = logp_s_BT + torch.randn(logp_s_BT.shape, dtype=torch.float64)
    kw = dict(divergence="js", discount=discount, ratio_clip=None)
    adv_BT = token_advantages(logp_s_BT, logp_t_BT, mask_BT, student_mask_BT=student_BT, **kw)
    by_position_BT = token_advantages(logp_s_BT, logp_t_BT, student_BT, **kw)
    assert (adv_BT[student_BT == 0] == 0).all()
    gaps = 0
    for b, (s, t) in enumerate(
        zip(_compact(logp_s_BT, student_BT), _compact(logp_t_BT, student_BT), strict=True)
    ):
        alone = token_advantages(s[None], t[None], torch.ones(1, len(s)), **kw)[0]
        torch.testing.assert_close(adv_BT[b][student_BT[b] == 1], alone, rtol=1e-12, atol=0)
        at = student_BT[b].nonzero().flatten()
        if (at.diff() > 1).any():  # an environment span between two student tokens
            gaps += 1
            assert not torch.allclose(by_position_BT[b][student_BT[b] == 1], alone)
    assert gaps > 0


def test_stepped_future_sum_matches_a_slow_reference():
    x_BT, _, student_BT = _interleaved(1)
    steps_BT = student_BT.bool()
    for discount in (0.0, 0.5, 1.0):
        fast = discounted_future_sum(x_BT, discount, steps_BT=steps_BT)
        ref = torch.zeros_like(x_BT)
        for b, t in itertools.product(*map(range, x_BT.shape)):
            n = 0
            for k in range(t + 1, x_BT.shape[1]):
                if steps_BT[b, k]:
                    n += 1
                    ref[b, t] += discount**n * x_BT[b, k]
        torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-15)
    # Every position counting is the positional sum, bit for bit.
    everywhere = torch.ones_like(steps_BT)
    assert torch.equal(
        discounted_future_sum(x_BT, 0.7, steps_BT=everywhere), discounted_future_sum(x_BT, 0.7)
    )


def test_dense_discount_skips_environment_tokens():
    gen = torch.Generator().manual_seed(2)
    _, mask_BT, student_BT = _interleaved(2)
    B, T = mask_BT.shape
    logp_s_BTK = torch.randn(B, T, 3, generator=gen, dtype=torch.float64).log_softmax(-1)[..., :2]
    logp_t_BTK = torch.randn(B, T, 3, generator=gen, dtype=torch.float64).log_softmax(-1)[..., :2]
    logp_BT = logp_s_BTK[..., 0].clone().requires_grad_()
    kw = dict(divergence="hellinger", discount=0.6, ratio_clip=None, is_cap=None)
    loss, _ = dense_surrogate_loss(
        logp_s_BTK, logp_t_BTK, logp_BT, logp_BT.detach(), mask_BT, student_mask_BT=student_BT, **kw
    )
    (grad_BT,) = torch.autograd.grad(loss, logp_BT)
    n = student_BT.sum()
    for b in range(B):
        k = student_BT[b] == 1
        row = logp_BT.detach()[b][k][None].requires_grad_()
        alone, _ = dense_surrogate_loss(
            logp_s_BTK[b][k][None],
            logp_t_BTK[b][k][None],
            row,
            row.detach(),
            torch.ones(1, int(k.sum())),
            normaliser=n,
            **kw,
        )
        (grad_alone,) = torch.autograd.grad(alone, row)
        torch.testing.assert_close(grad_BT[b][k], grad_alone[0], rtol=1e-12, atol=1e-15)
        assert (grad_BT[b][~k] == 0).all()


def test_statistics_count_student_tokens_only():
    """The logged divergence and ell are means over the student's tokens, and the loss's
    token_mean divides by their number: environment tokens with any values change nothing."""
    logp_s_BT, mask_BT, student_BT = _interleaved(3)
    logp_t_BT = logp_s_BT - 0.5
    noisy_s_BT = torch.where(student_BT == 1, logp_s_BT, 50.0)  # wild values at env tokens
    kw = dict(divergence="reverse_kl", discount=0.5, ratio_clip=None)
    adv_BT, stats = token_advantages_with_stats(
        noisy_s_BT, logp_t_BT, mask_BT, student_mask_BT=student_BT, **kw
    )
    assert stats.mean_ell == pytest.approx(0.5) and stats.divergence_estimate == pytest.approx(0.5)
    loss, _ = surrogate_loss(
        noisy_s_BT, adv_BT, noisy_s_BT, mask_BT, student_mask_BT=student_BT, is_cap=None
    )
    kept = student_BT == 1
    expected = (-adv_BT[kept] * noisy_s_BT[kept]).sum() / kept.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
