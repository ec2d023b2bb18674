"""The paper's central finding in miniature (docs/math.md §9).

One state, vocabulary 32, a random teacher. Gradient descent on the student's logits with the
exact expected update (a sum over the whole vocabulary, no sampling): the OPD+ direction drives
the student to the teacher under every divergence; the OPD (stop-gradient) direction collapses
forward KL and JS onto a single token, and leaves reverse KL unchanged.
"""

import pytest
import torch
from divergence_cases import registry_divergences

from learner.advantages import token_advantages
from learner.divergences import get_divergence
from learner.loss import surrogate_loss

V = 32
STEPS = 1500
# TV's OPD+ cost is ½·sign(ell): a subgradient method needs a decaying step to settle.
LR0, LR_DECAY = 2.0, 100.0
# Far beyond any ell on the converging runs; it only keeps collapsing runs finite.
RATIO_CLIP = 30.0


def _teacher_logp(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=gen, dtype=torch.float64).log_softmax(-1)


def expected_direction(z, logq, div, estimator):
    """∇_z E_{y~softmax(z)}[−A(y)·log p(y)] with A held fixed: −p ⊙ (A − ⟨p, A⟩).

    Each vocabulary token is a length-1 sequence of the batch, so A comes from the real
    `token_advantages`; `test_expected_direction_is_the_surrogate_gradient` checks the closed
    form against autograd through the real `surrogate_loss`.
    """
    logp_V = z.log_softmax(-1)
    adv_V = token_advantages(
        logp_V[:, None],
        logq[:, None],
        torch.ones(V, 1),
        divergence=div,
        estimator=estimator,
        ratio_clip=RATIO_CLIP,
    )[:, 0]
    p_V = logp_V.exp()
    return -p_V * (adv_V - (p_V * adv_V).sum())


def train(div, estimator, logq):
    z = torch.zeros(V, dtype=torch.float64)
    for step in range(STEPS):
        lr = LR0 / (1 + step / LR_DECAY) ** 0.5
        z = z - lr * expected_direction(z, logq, div, estimator)
    return z.softmax(-1)


def tv_distance(p, logq):
    return 0.5 * (p - logq.exp()).abs().sum().item()


@pytest.mark.parametrize("estimator", ["opd_plus", "opd"])
def test_expected_direction_is_the_surrogate_gradient(estimator):
    logq, div = _teacher_logp(), get_divergence("js")
    z = torch.randn(V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z.requires_grad_()
    logp_V1 = z.log_softmax(-1)[:, None]
    adv_V1 = token_advantages(
        logp_V1, logq[:, None], torch.ones(V, 1), divergence=div, estimator=estimator
    )
    # Weighting by sg(p(y)) with normaliser 1 makes the batch sum the exact expectation.
    loss, _ = surrogate_loss(
        logp_V1,
        adv_V1 * logp_V1.detach().exp(),
        logp_V1.detach(),
        torch.ones(V, 1),
        is_cap=None,
        normaliser=1.0,
    )
    (grad,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(grad, expected_direction(z.detach(), logq, div, estimator))


@pytest.mark.parametrize("div", registry_divergences(), ids=lambda d: d.name)
def test_opd_plus_converges_to_teacher(div):
    logq = _teacher_logp()
    start = tv_distance(torch.full((V,), 1.0 / V, dtype=torch.float64), logq)
    assert start > 0.2
    assert tv_distance(train(div, "opd_plus", logq), logq) < 1e-2


@pytest.mark.parametrize("name", ["forward_kl", "js"])
def test_opd_collapses_onto_one_token(name):
    p = train(get_divergence(name), "opd", _teacher_logp())
    assert p.max().item() > 0.99


def test_opd_reverse_kl_converges_like_opd_plus():
    logq, div = _teacher_logp(), get_divergence("reverse_kl")
    p_opd = train(div, "opd", logq)
    assert tv_distance(p_opd, logq) < 1e-3
    torch.testing.assert_close(p_opd, train(div, "opd_plus", logq), rtol=1e-9, atol=1e-12)
