"""What the driver thread asks of the producer thread: one dataclass per request.

``RolloutService`` sends them through the channel; ``Producer.handle`` dispatches on the type,
so a message it does not know is a TypeError at once, not a silent fall-through. Each says what
its answer is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Produce:
    """Produce batches first_step..last_step from ``source`` (answer: None).

    encode: prompt text → token ids (the one helper shared with evaluation)."""

    source: Any
    encode: Callable[[str], list[int]]
    first_step: int
    last_step: int


@dataclass(frozen=True)
class Publish:
    """New weights (an object-store handle, or the tensors in-process) as ``version``;
    samplers load them after their current chunk (answer: None)."""

    weights: Any
    version: int


@dataclass(frozen=True)
class MarkServed:
    """``version`` was delivered to every live sampler by another path (answer: None)."""

    version: int


@dataclass(frozen=True)
class WaitPush:
    """Answer (None) once every live sampler serves the last published version."""


@dataclass(frozen=True)
class SamplerVersions:
    """Answer: the policy version of each live sampler."""


@dataclass(frozen=True)
class SamplerHandles:
    """Answer: the handles of the live samplers."""


@dataclass(frozen=True)
class WorkerHandle:
    """Answer: the current handle of pool worker ``name``, or None."""

    name: str


@dataclass(frozen=True)
class Generate:
    """In-process evaluation (engines are not thread-safe, so it runs on the producer thread):
    answer: the lowest-slot live sampler's ``generate(prompt_ids, **kwargs)``."""

    prompt_ids: list[list[int]]
    kwargs: dict


@dataclass(frozen=True)
class ScorerCall:
    """Evaluation on the teacher (``RolloutService.score`` / ``teacher_greedy``): start
    ``method(*args, **kwargs)`` on the lowest-slot ready scorer; answer: ``(handle, call)``,
    for the driver to wait on with its deadline, or None when no scorer is ready. In-process
    the call has then already run, on the producer thread (engines are not thread-safe)."""

    method: str
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Scale:
    """Aim for ``samplers`` / ``scorers`` workers (None: unchanged) (answer: None)."""

    samplers: int | None
    scorers: int | None


@dataclass(frozen=True)
class CollectiveMembers:
    """Answer: ``(handles, waiting)``: the samplers a collective weight group holds now (ready,
    or started and waiting for the group's weights; not draining), in slot order, and how many
    of them wait."""


@dataclass(frozen=True)
class CollectiveServed:
    """``version`` reached the samplers ``handles`` by a collective push (answer: None): they
    serve it, and those that waited for it take work from now on."""

    version: int
    handles: tuple


@dataclass(frozen=True)
class CollectiveLost:
    """The samplers ``handles`` died, or were killed blocked in a broken collective push:
    replaced and their work handed out again, as for any death (answer: None)."""

    handles: tuple
    why: str


Message = (
    Produce
    | Publish
    | MarkServed
    | WaitPush
    | SamplerVersions
    | SamplerHandles
    | WorkerHandle
    | Generate
    | ScorerCall
    | Scale
    | CollectiveMembers
    | CollectiveServed
    | CollectiveLost
)
