"""Every divergence's three functions agree with each other (docs/math.md §4 table)."""

import pytest
import torch
from divergence_cases import registry_divergences, shifted

from learner.divergences import DIVERGENCES, Divergence, divergence_names, get_divergence

# The maths doc's table; the registry may hold more (all of which are tested below).
REQUIRED = ("reverse_kl", "forward_kl", "js", "hellinger", "tv", "pearson", "neyman", "jeffreys")

ALL = [
    *registry_divergences({"alpha": [{"alpha": a} for a in (-1.0, 0.0, 0.3, 0.5, 1.0, 2.0)]}),
    shifted(get_divergence("js"), 0.7),
]

# Away from 0 so that TV's kink is not on the grid.
ELL = torch.linspace(-6.0, 6.0, 240, dtype=torch.float64)


def _close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_registry_has_required_names():
    assert set(REQUIRED) <= set(DIVERGENCES)
    assert set(REQUIRED) | {"alpha"} <= set(divergence_names())
    for name in REQUIRED:
        assert get_divergence(name).name == name


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="reverse_kl.*forward_kl"):
        get_divergence("kl")


def test_parameter_errors():
    with pytest.raises(ValueError, match=r"divergence 'alpha': .*missing .*'alpha'"):
        get_divergence("alpha")
    with pytest.raises(ValueError, match=r"divergence 'alpha': .*unexpected keyword .*'beta'"):
        get_divergence("alpha", beta=0.5)
    with pytest.raises(ValueError, match=r"'reverse_kl' takes no parameters, got \['alpha'\]"):
        get_divergence("reverse_kl", alpha=0.5)
    div = get_divergence("js")
    with pytest.raises(ValueError, match=r"parameters \['alpha'\] given with a Divergence"):
        get_divergence(div, alpha=0.5)


def test_instance_passes_through():
    div = get_divergence("alpha", alpha=0.5)
    assert get_divergence(div) is div
    assert isinstance(div, Divergence)


@pytest.mark.parametrize("div", ALL, ids=lambda d: d.name)
def test_zero_at_equal_distributions(div):
    one = torch.ones((), dtype=torch.float64)
    assert div.f(one).item() == pytest.approx(0.0, abs=1e-15)
    assert div.cost(torch.zeros((), dtype=torch.float64)).item() == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("div", ALL, ids=lambda d: d.name)
def test_cost_is_f_over_r(div):
    r = ELL.exp()
    _close(div.cost(ELL), div.f(r) / r)


@pytest.mark.parametrize("div", ALL, ids=lambda d: d.name)
def test_grad_cost_is_f_prime(div):
    r = ELL.exp().requires_grad_()
    (f_prime,) = torch.autograd.grad(div.f(r).sum(), r)
    _close(div.grad_cost(ELL), f_prime)


@pytest.mark.parametrize("div", ALL, ids=lambda d: d.name)
def test_g_plus_r_g_prime_is_f_prime(div):
    r = ELL.exp().requires_grad_()
    (g_prime,) = torch.autograd.grad(div.cost(r.log()).sum(), r)
    _close(div.cost(ELL) + r.detach() * g_prime, div.grad_cost(ELL))


@pytest.mark.parametrize("div", ALL, ids=lambda d: d.name)
def test_f_is_convex(div):
    assert (div.grad_cost(ELL).diff() >= -1e-12).all()


@pytest.mark.parametrize("div", ALL, ids=lambda d: d.name)
def test_float32_accuracy_near_equal_distributions(div):
    # Forming r = exp(ell) and subtracting 1 would lose all relative accuracy here.
    ell64 = torch.tensor([-3e-6, -1e-6, 1e-6, 3e-6], dtype=torch.float64)
    ell32 = ell64.float()
    # The Amari cost is a difference of O(ell) terms: accurate to float32 eps absolutely only.
    cost_atol = 1e-12 if div.name.startswith("alpha") else 1e-14
    for fn, atol in ((div.cost, cost_atol), (div.grad_cost, 1e-14)):
        # Where f'(1) ≠ 0 the O(1) offset sets the scale; float32 cannot resolve below it.
        offset = fn(torch.zeros((), dtype=torch.float64)).abs().item()
        _close(fn(ell32).double(), fn(ell64), rtol=1e-3, atol=atol + 1e-6 * offset)


def test_shifted_generator():
    base, c = get_divergence("forward_kl"), 0.7
    moved = shifted(base, c)
    r = ELL.exp()
    _close(moved.f(r), base.f(r) + c * (r - 1))
    _close(moved.grad_cost(ELL), base.grad_cost(ELL) + c)


def test_alpha_limits_match_kl_up_to_linear_term():
    # Amari's α → 1 and α → 0 limits are the KLs plus a linear term c·(r − 1).
    _close(get_divergence("alpha", alpha=1.0).grad_cost(ELL), ELL)
    _close(get_divergence("alpha", alpha=0.0).grad_cost(ELL), -torch.expm1(-ELL))
    for a, limit in ((1.0 - 1e-9, 1.0), (1e-9, 0.0)):
        near, at = get_divergence("alpha", alpha=a), get_divergence("alpha", alpha=limit)
        _close(near.cost(ELL), at.cost(ELL), rtol=1e-6, atol=1e-8)
