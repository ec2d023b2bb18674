"""Verifiers: (problem, completion) → reward in [0, 1], as a registry chosen per source.

Every prompt source has a default verifier (``rollout.sources.SourceKind.verifier``);
``task.verifier`` picks another one for the run. A ``Problem`` carries the name (and
arguments) of the verifier that scores it, so scoring needs no config and may run in another
process. Built in:

    ``marker``         the built-in ``#`` answer marker (``rollout.tasks.verify``): the text after
                       the first ``#`` equals the answer (integers by value).
    ``reasoning_gym``  the reasoning-gym task's own ``score_answer`` on the text inside
                       ``<answer>`` tags (reasoning_gym sources only: it needs the task item).
    ``exact``          the whole completion, stripped of surrounding whitespace, equals the answer.
    ``regex``          the last match of ``task.verifier_pattern`` in the completion (its first
                       group, else the whole match), stripped, equals the answer.
    ``math``           final-answer equivalence through ``math-verify``: ``\\boxed{}``, LaTeX or
                       plain answers compared as mathematical expressions (``1/2`` = ``0.5`` =
                       ``\\frac{1}{2}``); partial credit never.

A problem without an answer (a prompt-only chat row) is never scored: ``score`` raises.
Standard library only at import (``math_verify`` and ``reasoning_gym`` load on first use).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollout import tasks
from services.errors import UserError

if TYPE_CHECKING:
    from rollout.sources import Problem


class VerifierError(UserError, ValueError):
    """An unknown verifier, a bad verifier argument, or a problem that cannot be scored."""


@dataclass(frozen=True)
class Verifier:
    """name: the ``task.verifier`` value. doc: one line for ``opdplus config --describe``.
    score: (problem, completion) → reward in [0, 1]. needs_pattern: takes
    ``task.verifier_pattern``. sources: the only source kinds it can score (empty: any)."""

    name: str
    doc: str
    score: Callable[[Problem, str], float]
    needs_pattern: bool = False
    sources: tuple[str, ...] = ()


VERIFIERS: dict[str, Verifier] = {}


def register_verifier(verifier: Verifier) -> Verifier:
    if verifier.name in VERIFIERS:
        raise ValueError(f"verifier {verifier.name!r} is already registered")
    VERIFIERS[verifier.name] = verifier
    return verifier


def get_verifier(name: str) -> Verifier:
    if name not in VERIFIERS:
        raise VerifierError(
            f"unknown verifier {name!r}; expected one of {', '.join(sorted(VERIFIERS))}"
        )
    return VERIFIERS[name]


def check_verifier(name: str, *, source: str, pattern: str = "") -> str | None:
    """Why ``name`` (with ``pattern``) cannot score problems of ``source``; None when it can."""
    if name not in VERIFIERS:
        return f"unknown verifier {name!r}; expected one of {', '.join(sorted(VERIFIERS))}"
    v = VERIFIERS[name]
    if v.sources and source not in v.sources:
        return f"verifier {name!r} scores only {', '.join(v.sources)} sources, not {source!r}"
    if v.needs_pattern:
        if not pattern:
            return f"verifier {name!r} needs task.verifier_pattern (a regular expression)"
        try:
            re.compile(pattern)
        except re.error as e:
            return f"task.verifier_pattern {pattern!r} is not a regular expression: {e}"
    return None


# ----------------------------------------------------------------------------- the verifiers


def _marker(problem: Problem, completion: str) -> float:
    return float(tasks.verify(completion, problem.answer))


def _reasoning_gym(problem: Problem, completion: str) -> float:
    from reasoning_gym.utils import extract_answer

    from rollout.sources import _rg_dataset

    task, seed, idx, config = problem.meta
    dataset = _rg_dataset(task, seed, config)
    return float(dataset.score_answer(extract_answer(completion), dataset[idx]))


def _norm(text: str) -> str:
    return " ".join(text.split())


def _exact(problem: Problem, completion: str) -> float:
    return float(_norm(completion) == _norm(problem.answer))


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def _regex(problem: Problem, completion: str) -> float:
    (pattern,) = problem.verifier[1:]
    matches = list(_compiled(pattern).finditer(completion))
    if not matches:
        return 0.0
    last = matches[-1]
    got = last.group(1) if last.re.groups else last.group(0)
    return float(got is not None and _norm(got) == _norm(problem.answer))


MATH_TIMEOUT_S = 60  # per parse and per comparison, main thread only (see _math)


def _math(problem: Problem, completion: str) -> float:
    """``math_verify.verify(parse(answer), parse(completion))``. Its timeouts use SIGALRM, which
    only the main thread may set: elsewhere (a Ray actor's worker thread) they are off."""
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    # Wall-clock limits: math-verify's 5 s default failed a true equivalence (x^2+2x vs
    # x(x+2), sympy's first simplify) on a loaded 2-core machine: scored 0, silently wrong.
    limit = {"parsing_timeout": MATH_TIMEOUT_S if main else None}
    answer = problem.answer
    # A reference answer is usually bare LaTeX ("x^2 + 2x", "\\sqrt{2}/2"): read it as math
    # mode, else math-verify takes the first number it finds ("2").
    bare = "$" not in answer and "\\boxed" not in answer
    gold = (parse(f"${answer}$", **limit) if bare else []) or parse(answer, **limit)
    pred = parse(completion, **limit)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=MATH_TIMEOUT_S if main else None))


register_verifier(
    Verifier("marker", "the text after the '#' answer marker equals the answer", _marker)
)
register_verifier(
    Verifier(
        "reasoning_gym",
        "the reasoning-gym task's own scorer on the <answer>…</answer> text",
        _reasoning_gym,
        sources=("reasoning_gym",),
    )
)
register_verifier(
    Verifier("exact", "the whole completion (whitespace-normalised) equals the answer", _exact)
)
register_verifier(
    Verifier(
        "regex",
        "the last match of task.verifier_pattern (its first group) equals the answer",
        _regex,
        needs_pattern=True,
    )
)
register_verifier(
    Verifier(
        "math",
        "final-answer equivalence via math-verify (\\boxed{}, LaTeX or plain: 1/2 = 0.5)",
        _math,
    )
)


def score_with(name: str, problem: Problem, completion: str) -> float:
    """Reward of ``completion`` for ``problem`` by the verifier ``name``."""
    if problem.answer == "":
        raise VerifierError(
            f"problem {problem.id!r} has no answer (a prompt-only row): it cannot be scored"
        )
    return get_verifier(name).score(problem, completion)
