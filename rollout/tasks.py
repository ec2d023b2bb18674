"""Built-in verifiable task: multi-digit addition (and subtraction) written out column by column.

Format (one problem, addition)::

    prompt      "347+285="
    completion  "7+5+0=12;4+8+1=13;3+2+1=06#632"

Each column, least significant first, is ``a+b+c=cd``: the two operand digits (0 when an
operand is shorter), the carry in, and a fixed two-digit result whose first digit is the carry
out. The final answer follows the marker ``#``. Subtraction (``a >= b``) uses the same layout,
``a-b-c=bd``, where ``b`` is the borrow out and ``d`` the digit. Operands have 1 to 3 digits, so
prompts are at most 8 characters and completions at most 31 (plus EOS): short enough for the
toy models to train on two CPU cores in minutes.

The held-out evaluation set is fixed (its own seed); the training generator never emits a
problem from it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

ANSWER_MARKER = "#"
EVAL_SEED = 10_007
EVAL_SIZE = 200
MAX_DIGITS = 3
TASK_CHARS = "0123456789+-=;#"

_INT_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Arithmetic:
    """One problem: ``a op b`` with its worked completion."""

    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "+" else self.a - self.b)

    @property
    def key(self) -> str:
        """Stable identity used for problem ids and for the train/eval split."""
        return f"{self.a}{self.op}{self.b}"

    def completion(self) -> str:
        """The gold worked solution (without EOS)."""
        return ";".join(_columns(self.a, self.b, self.op)) + ANSWER_MARKER + self.answer


def _columns(a: int, b: int, op: str) -> list[str]:
    """One ``x+y+c=cd`` (or ``x-y-c=bd``) string per column, least significant first."""
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]
    carry, cols = 0, []
    for x, y in zip(map(int, da), map(int, db), strict=True):
        if op == "+":
            total = x + y + carry
            out, digit = divmod(total, 10)
        else:
            total = x - y - carry
            out, digit = (1, total + 10) if total < 0 else (0, total)
        cols.append(f"{x}{op}{y}{op}{carry}={out}{digit}")
        carry = out
    return cols


def _random_problem(rng: random.Random, ops: tuple[str, ...]) -> Arithmetic:
    # Digit counts are drawn first so short operands are as common as long ones.
    a = _random_operand(rng)
    b = _random_operand(rng)
    op = rng.choice(ops)
    if op == "-" and b > a:
        a, b = b, a
    return Arithmetic(a, b, op)


def _random_operand(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_DIGITS)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def eval_problems(ops: tuple[str, ...] = ("+",), n: int = EVAL_SIZE) -> list[Arithmetic]:
    """The fixed held-out set: ``n`` distinct problems drawn with ``EVAL_SEED``."""
    rng = random.Random(f"{EVAL_SEED}:{''.join(ops)}")
    seen: dict[str, Arithmetic] = {}
    while len(seen) < n:
        p = _random_problem(rng, ops)
        seen.setdefault(p.key, p)
    return list(seen.values())


class ArithmeticGenerator:
    """Unlimited seeded training problems, disjoint from the held-out set.

    The position (number of problems emitted) fully determines the state: ``skip_to(pos)``
    replays the stream, so a restored generator continues exactly where the original was.
    Replaying costs about a microsecond per problem.
    """

    def __init__(self, seed: int = 0, ops: tuple[str, ...] = ("+",)) -> None:
        if not ops or set(ops) - {"+", "-"}:
            raise ValueError(f"ops must be a non-empty subset of ('+', '-'), got {ops!r}")
        self.seed, self.ops = seed, tuple(ops)
        self._held_out = {p.key for p in eval_problems(self.ops)}
        self.skip_to(0)

    def skip_to(self, position: int) -> None:
        self._rng = random.Random(f"train:{self.seed}:{''.join(self.ops)}")
        self.position = 0
        for _ in range(position):
            self.next()

    def next(self) -> Arithmetic:
        while True:
            p = _random_problem(self._rng, self.ops)
            if p.key not in self._held_out:
                self.position += 1
                return p


def extract_answer(completion: str) -> str | None:
    """The stripped text after the first ``#``, or None when there is no marker or nothing after it.

    Nothing may follow the answer: a completion that keeps writing after it is not given the
    benefit of the doubt (``"#632;1"`` is the answer ``"632;1"``, which is wrong).
    """
    _, marker, tail = completion.partition(ANSWER_MARKER)
    tail = tail.strip()
    return tail if marker and tail else None


def verify(completion: str, answer: str) -> bool:
    """True when the completion's final answer equals ``answer``.

    Integers compare by value (``"#0632"`` matches ``"632"``); anything else compares as text.
    """
    got, want = extract_answer(completion), answer.strip()
    if got is None:
        return False
    if _INT_RE.fullmatch(got) and _INT_RE.fullmatch(want):
        return int(got) == int(want)
    return got == want
