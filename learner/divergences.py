"""f-divergences between the student's and the teacher's next-token distributions.

Conventions (docs/math.md §1 and §4). P = π_student(·|s), Q = π_teacher(·|s),
r = P/Q on a token and ell = log r = log π_student − log π_teacher. For a convex generator f
with f(1) = 0,

    D_f(P‖Q) = E_Q[f(P/Q)] = E_P[g(P/Q)],    g(r) = f(r)/r.

Each `Divergence` provides, elementwise on float tensors:

- `f(r)`: the generator (reference and tests only; it forms r).
- `cost(ell)`: g(r), the OPD (stop-gradient) immediate cost. Averaged over tokens sampled from
  the student it is an unbiased estimate of D_f(student‖teacher), so its mean over a batch's
  response tokens is the per-token divergence to log.
- `grad_cost(ell)`: f'(r) = g(r) + r·g'(r), the OPD+ immediate cost.

`cost` and `grad_cost` are computed from ell with expm1 / log1p / softplus rather than by forming
r and subtracting 1, so they keep their relative accuracy when the student is near the teacher.
They do not clamp: callers clamp ell first (see `learner.advantages`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

_LOG2 = math.log(2.0)

ElementwiseFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Divergence:
    """An f-divergence: generator f(r), OPD cost g(ell) = f(r)/r and OPD+ cost f'(r)."""

    name: str
    generator_fn: ElementwiseFn = field(repr=False)
    cost_fn: ElementwiseFn = field(repr=False)
    grad_cost_fn: ElementwiseFn = field(repr=False)

    def f(self, r: Tensor) -> Tensor:
        """Generator f(r) at the ratio r = π_student/π_teacher (any shape)."""
        return self.generator_fn(r)

    def cost(self, ell: Tensor) -> Tensor:
        """OPD immediate cost g(r) = f(r)/r at r = exp(ell); E_{y~student}[g] = D_f."""
        return self.cost_fn(ell)

    def grad_cost(self, ell: Tensor) -> Tensor:
        """OPD+ immediate cost f'(r) at r = exp(ell)."""
        return self.grad_cost_fn(ell)


def _js_cost(ell: Tensor) -> Tensor:
    """g = ½[ell − (1 + 1/r)·log((1 + r)/2)] = N(ell)/(4·sigmoid(ell)), u = tanh(ell/2).

    N = ell·u − 2·log cosh(ell/2) is O(ell²) near 0 and the table's softplus form loses all
    relative accuracy there; N = ell·u + log1p(−u²) near 0, and far from 0
    N = 2[log 2 − softplus(−|ell|) − |ell|·sigmoid(−|ell|)], neither of which cancels.
    """
    small = ell.clamp(-2.0, 2.0)
    u = torch.tanh(0.5 * small)
    near = small * u + torch.log1p(-u * u)
    a = ell.abs()
    far = 2 * (_LOG2 - F.softplus(-a) - a * torch.sigmoid(-a))
    return torch.where(ell.abs() < 2.0, near, far) / (4 * torch.sigmoid(ell))


def _js_grad_cost(ell: Tensor) -> Tensor:
    # f' = ½·log(2r/(1 + r)) = −½·log1p(expm1(−ell)/2): relative accuracy near ell = 0;
    # the softplus form ½[log 2 − softplus(−ell)] does not overflow for very negative ell.
    near = -0.5 * torch.log1p(0.5 * torch.expm1(-ell.clamp(min=-1.0)))
    far = 0.5 * (_LOG2 - F.softplus(-ell))
    return torch.where(ell > -1.0, near, far)


def _expm1_over(a: float, x: Tensor) -> Tensor:
    """expm1(a·x)/a, continued to x at a = 0."""
    return x if a == 0 else torch.expm1(a * x) / a


def _amari(alpha: float) -> Divergence:
    """Amari α-divergence, f(r) = (r^α − α·r − (1 − α))/(α(α − 1)), for every real α.

    At α = 1 and α = 0 it is the limit: f = r·log r − r + 1 (reverse KL) and
    f = −log r + r − 1 (forward KL). These differ from `reverse_kl`/`forward_kl` by a linear
    term c·(r − 1): the same divergence and the same OPD+ estimator, a different OPD estimator.
    """
    a = float(alpha)

    def generator(r: Tensor) -> Tensor:
        if a == 1.0:
            return torch.xlogy(r, r) - r + 1
        if a == 0.0:
            return -torch.log(r) + r - 1
        return (r**a - a * r - (1 - a)) / (a * (a - 1))

    def cost(ell: Tensor) -> Tensor:
        # Two algebraically equal forms of g; each divides only by a factor bounded away from 0
        # on its side of α = ½, so neither cancels catastrophically near α = 0 or α = 1.
        if a >= 0.5:
            return (_expm1_over(a - 1, ell) + torch.expm1(-ell)) / a
        return (torch.exp(-ell) * _expm1_over(a, ell) + torch.expm1(-ell)) / (a - 1)

    return Divergence(
        name=f"alpha={a:g}",
        generator_fn=generator,
        cost_fn=cost,
        grad_cost_fn=lambda ell: _expm1_over(a - 1, ell),
    )


DIVERGENCES: dict[str, Divergence] = {
    d.name: d
    for d in (
        Divergence(
            "reverse_kl",  # KL(student‖teacher)
            generator_fn=lambda r: torch.xlogy(r, r),
            cost_fn=lambda ell: ell,
            grad_cost_fn=lambda ell: ell + 1,
        ),
        Divergence(
            "forward_kl",  # KL(teacher‖student)
            generator_fn=lambda r: -torch.log(r),
            cost_fn=lambda ell: -ell * torch.exp(-ell),
            grad_cost_fn=lambda ell: -torch.exp(-ell),
        ),
        Divergence(
            "js",
            generator_fn=lambda r: 0.5 * (torch.xlogy(r, r) - (1 + r) * torch.log((1 + r) / 2)),
            cost_fn=_js_cost,
            grad_cost_fn=_js_grad_cost,
        ),
        Divergence(
            "hellinger",
            generator_fn=lambda r: (torch.sqrt(r) - 1) ** 2,
            cost_fn=lambda ell: torch.expm1(-0.5 * ell) ** 2,
            grad_cost_fn=lambda ell: -torch.expm1(-0.5 * ell),
        ),
        Divergence(
            "tv",
            generator_fn=lambda r: 0.5 * torch.abs(r - 1),
            cost_fn=lambda ell: 0.5 * torch.abs(torch.expm1(-ell)),
            grad_cost_fn=lambda ell: 0.5 * torch.sign(ell),
        ),
        Divergence(
            "pearson",
            generator_fn=lambda r: (r - 1) ** 2,
            # (r − 1)²/r = (r − 1)(1 − 1/r): no overflow of expm1(ell)² before the product does.
            cost_fn=lambda ell: -torch.expm1(ell) * torch.expm1(-ell),
            grad_cost_fn=lambda ell: 2 * torch.expm1(ell),
        ),
        Divergence(
            "neyman",
            generator_fn=lambda r: (r - 1) ** 2 / r,
            cost_fn=lambda ell: torch.expm1(-ell) ** 2,
            grad_cost_fn=lambda ell: -torch.expm1(-2 * ell),
        ),
        Divergence(
            "jeffreys",  # KL(student‖teacher) + KL(teacher‖student)
            generator_fn=lambda r: (r - 1) * torch.log(r),
            cost_fn=lambda ell: -ell * torch.expm1(-ell),
            grad_cost_fn=lambda ell: ell - torch.expm1(-ell),
        ),
    )
}

_PARAMETRIC: dict[str, Callable[..., Divergence]] = {"alpha": _amari}


def divergence_names() -> tuple[str, ...]:
    """Every name `get_divergence` accepts (`alpha` needs the parameter alpha=...)."""
    return (*DIVERGENCES, *_PARAMETRIC)


def get_divergence(name: str | Divergence, **params: float) -> Divergence:
    """Look up a divergence by name; a `Divergence` passes through unchanged.

    `get_divergence("alpha", alpha=0.5)` builds an Amari α-divergence. Raises ValueError for an
    unknown name, a missing parameter, or parameters given to a parameter-free divergence.
    """
    if isinstance(name, Divergence):
        if params:
            raise ValueError(f"parameters {sorted(params)} given with a Divergence instance")
        return name
    if name in DIVERGENCES:
        if params:
            raise ValueError(f"divergence {name!r} takes no parameters, got {sorted(params)}")
        return DIVERGENCES[name]
    if name in _PARAMETRIC:
        try:
            return _PARAMETRIC[name](**params)
        except TypeError as err:
            raise ValueError(f"divergence {name!r}: {err}") from err
    raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(divergence_names())}")
