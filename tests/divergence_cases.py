"""The divergences every parametrised maths test runs over, read from the registry.

A divergence added to `learner.divergences.DIVERGENCES` is tested everywhere at once; a new
parametric family needs example parameters in `PARAMS`, and `test_divergences.py` fails until
it has them. Also the generator shift f → f + c·(r − 1), a test tool (not production code).
"""

from __future__ import annotations

import torch

from learner.divergences import DIVERGENCES, Divergence, divergence_names, get_divergence

# Parametric families at a few parameters (alpha = 0 and 1 are the KL limits).
PARAMS: dict[str, list[dict[str, float]]] = {"alpha": [{"alpha": 0.5}]}


def registry_divergences(params: dict[str, list[dict[str, float]]] = PARAMS) -> list[Divergence]:
    """Every registered divergence; parametric ones at each of their example parameters."""
    missing = [n for n in divergence_names() if n not in DIVERGENCES and n not in params]
    if missing:
        raise AssertionError(f"parametric divergences without test parameters: {missing}")
    return [
        *DIVERGENCES.values(),
        *(get_divergence(name, **kw) for name, kws in params.items() for kw in kws),
    ]


def shifted(div: Divergence, c: float) -> Divergence:
    """The same divergence with generator f(r) + c·(r − 1).

    D_f is unchanged, the OPD+ cost shifts by the constant c and the OPD cost by
    c·(1 − 1/r) = −c·expm1(−ell), which is why only OPD+ is invariant to the shift.
    """
    return Divergence(
        name=f"{div.name}{c:+g}(r-1)",
        generator_fn=lambda r: div.f(r) + c * (r - 1),
        cost_fn=lambda ell: div.cost(ell) - c * torch.expm1(-ell),
        grad_cost_fn=lambda ell: div.grad_cost(ell) + c,
    )
