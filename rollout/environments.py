"""Environments: what answers the student between its turns in an episode (docs/math.md §10).

An environment is a plain object (no Ray, no engine): ``reset(problem)`` starts an episode and
returns its first messages; ``step(assistant_turn)`` takes the student's turn and returns the
environment's answer (a tool's output, as a ``tool`` turn) or ``done``. A tool failure — a
malformed call, a snippet that raises, loops, allocates or prints too much — is an observation
the student sees (``error: ...``), never an exception out of ``step``. One object runs one
episode at a time; make one per concurrent episode.

Seeded: an episode's randomness comes from ``EnvironmentOptions.seed`` and the problem's id
(and the call's index within the episode), never from the order episodes run in, so a
re-dispatched episode replays the same answers.

A tool call is a span the student writes, ``<calc>12*34</calc>`` or ``<python>print(6*7)
</python>``: plain characters, so a character-level toy tokenizer can write it (its vocabulary
needs the marker letters, ``< > /`` and the expression's characters). The turn ends at the
closing marker (``Environment.stop`` lists the strings a sampler stops at); a turn without an
opening marker ends the episode. The last call in a turn is answered; an opening marker with no
closing one is answered with an error.

Kinds live in the ``ENVIRONMENTS`` registry (``register_environment`` adds one), like the prompt
sources. Built in:
    ``calculator``  ``<calc>EXPR</calc>`` → the value (``rollout.tools.calculate``: an AST
                    walker over numbers and + - * / // % **, exact rationals, no eval).
    ``python``      ``<python>CODE</python>`` → what the snippet printed, run in a separate
                    process under CPU, memory, output and wall-clock limits with no network
                    (``rollout.tools.run_python``, ``EnvironmentOptions.python``).
Episodes run in ``rollout/episodes.py`` (the samplers' and the evaluation's loop: generation
until a stop, the tools, the answers appended as tokens), one environment per episode.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from rollout.prompting import Chat, Turn
from rollout.tools import PythonLimits, ToolError, ToolResult, calculate, run_python
from services.errors import UserError

if TYPE_CHECKING:
    from rollout.sources import Problem

TOOL_ROLE = "tool"


class EnvError(UserError, ValueError):
    """An unknown environment name or an option it cannot use."""


@dataclass(frozen=True)
class Step:
    """The environment's answer to one student turn.

    turns: the messages to append (a ``tool`` turn; empty when done). done: the episode is over.
    tool_calls, tool_errors: how many calls the turn made and how many failed (for metrics).
    """

    turns: tuple[Turn, ...]
    done: bool
    tool_calls: int = 0
    tool_errors: int = 0


class Environment(Protocol):
    """What a sampler needs from an environment (module docstring)."""

    name: str
    stop: tuple[str, ...]  # strings that end a student turn at a tool call

    def reset(self, problem: Problem) -> tuple[Turn, ...]: ...

    def step(self, assistant_turn: str) -> Step: ...

    def pending(self, assistant_turn: str) -> bool:
        """The turn opened a call it has not closed (cut by a token limit: counted)."""
        ...


@dataclass(frozen=True)
class EnvironmentOptions:
    """Everything an environment may be built from (each kind reads what it needs).

    seed: the run's seed (module docstring). system: an optional system message put before the
    problem's own turns (e.g. how to call the tool). python: the python tool's limits.
    """

    seed: int
    system: str | None = None
    python: PythonLimits = field(default_factory=PythonLimits)


def episode_prompt(env: Environment, problem: Problem) -> Chat:
    """``env.reset(problem)`` as the prompt the student sees (its turns, with the problem's
    template kwargs): what the producer encodes and the episode's chat starts from."""
    kwargs = problem.prompt.template_kwargs if isinstance(problem.prompt, Chat) else ""
    return Chat(env.reset(problem), kwargs)


def episode_seed(seed: int, problem_id: str, call: int = 0) -> int:
    """A 63-bit seed for one call of one episode, from the run's seed and the problem's id
    (stable across processes and Python versions: sha256, not hash())."""
    digest = hashlib.sha256(f"{seed}\0{problem_id}\0{call}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class ToolEnvironment:
    """An episode with one tool, called as ``{open}ARGUMENT{close}`` (module docstring).

    tool: (argument, seed) → ToolResult; the seed is `episode_seed` of this call.
    """

    def __init__(
        self,
        name: str,
        *,
        open: str,
        close: str,
        tool: Callable[[str, int], ToolResult],
        options: EnvironmentOptions,
    ) -> None:
        self.name = name
        self.open, self.close = open, close
        self.stop = (close,)
        self._tool = tool
        self._options = options
        self._problem_id: str | None = None
        self._calls = 0
        self._done = True

    def pending(self, assistant_turn: str) -> bool:
        """The turn's last opening marker has no closing marker after it."""
        start = assistant_turn.rfind(self.open)
        return start >= 0 and self.close not in assistant_turn[start + len(self.open) :]

    def reset(self, problem: Problem) -> tuple[Turn, ...]:
        """Start an episode on ``problem``: the system message (if any), then its turns."""
        self._problem_id, self._calls, self._done = problem.id, 0, False
        system = (Turn("system", self._options.system),) if self._options.system else ()
        if isinstance(problem.prompt, Chat):
            return system + problem.prompt.turns
        return (*system, Turn("user", problem.prompt))

    def step(self, assistant_turn: str) -> Step:
        """Answer the last tool call of ``assistant_turn``, or end the episode without one."""
        if self._done:
            raise RuntimeError(f"{self.name}: step() before reset() or after the episode ended")
        start = assistant_turn.rfind(self.open)
        if start < 0:
            self._done = True
            return Step(turns=(), done=True)
        argument = assistant_turn[start + len(self.open) :]
        end = argument.find(self.close)
        if end < 0:
            result = ToolResult(f"error: the call was not closed with {self.close}", True)
        else:
            seed = episode_seed(self._options.seed, self._problem_id, self._calls)
            result = self._tool(argument[:end], seed)
        self._calls += 1
        return Step(
            turns=(Turn(TOOL_ROLE, result.text),),
            done=False,
            tool_calls=1,
            tool_errors=int(result.error),
        )


def _calculator_tool(expression: str, seed: int) -> ToolResult:
    try:
        return ToolResult(calculate(expression), False)
    except ToolError as e:
        return ToolResult(f"error: {e}", True)


@dataclass(frozen=True)
class EnvironmentKind:
    """One registered kind of environment. name: its key. doc: one line for help and errors.
    build: options → a fresh `Environment`."""

    name: str
    doc: str
    build: Callable[[EnvironmentOptions], Environment]


ENVIRONMENTS: dict[str, EnvironmentKind] = {}


def register_environment(kind: EnvironmentKind) -> EnvironmentKind:
    """Add a kind to ``ENVIRONMENTS`` (its name must be new)."""
    if kind.name in ENVIRONMENTS:
        raise ValueError(f"environment {kind.name!r} is already registered")
    ENVIRONMENTS[kind.name] = kind
    return kind


def get_environment_kind(name: str) -> EnvironmentKind:
    if name not in ENVIRONMENTS:
        raise EnvError(f"unknown environment {name!r}; expected one of {', '.join(ENVIRONMENTS)}")
    return ENVIRONMENTS[name]


def make_environment(name: str, options: EnvironmentOptions) -> Environment:
    """A fresh environment of kind ``name`` (one per concurrent episode)."""
    return get_environment_kind(name).build(options)


register_environment(
    EnvironmentKind(
        name="calculator",
        doc="<calc>EXPR</calc> → the value of an arithmetic expression",
        build=lambda o: ToolEnvironment(
            "calculator", open="<calc>", close="</calc>", tool=_calculator_tool, options=o
        ),
    )
)
register_environment(
    EnvironmentKind(
        name="python",
        doc="<python>CODE</python> → what the snippet printed (sandboxed process, no network)",
        build=lambda o: ToolEnvironment(
            "python",
            open="<python>",
            close="</python>",
            tool=lambda code, seed: run_python(code, limits=o.python, seed=seed),
            options=o,
        ),
    )
)
