"""Who gets which work: the rollout tier's decisions as plain code (no Ray, no threads, no clock).

The producer (services/producer.py) owns the calls and the clock and asks this module what to
do; everything here is tested through its public API in tests/test_scheduler.py.

- **Queue.** A step's prompts wait as one run of consecutive prompt groups (a ``Chunk``). A free
  sampler cuts off its ``share``: its part of a step in proportion to its measured speed (prompt
  groups per second) among the ready samplers, so a slow sampler takes a small chunk and a fast
  one a large one, and each engine still batches as much as it can (on small models a vLLM call
  costs about the same for 2 prompts as for 32). ``fixed_groups`` > 0 fixes the chunk size.
- **Scoring.** Sampled groups wait in ``unscored``; an idle scorer takes those waiting (up to
  its part of a step) in one teacher call (one call per group cost a vLLM scheduling round per
  4 sequences).
- **Re-dispatch.** The groups a dead worker held go back to the front of their queue, with
  their attempt counted, in order; a chunk's unfinished positions as runs of consecutive ones.
- **Admission.** A step opens when a sampler serves a version allowed to sample it and the
  channel has room for its samples (an empty pipeline always admits one step).
- **Seeds.** A chunk's seed is fixed by (run seed, step, position in the step), so re-sampled
  work draws the same tokens on any sampler.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rollout.records import Rollout
from rollout.sampler import WorkItem


@dataclass(frozen=True)
class Chunk:
    """Consecutive prompt groups of one step: items[i] is the prompt at position first + i."""

    step: int
    first: int
    items: tuple[WorkItem, ...]
    attempt: int = 1  # 1 + earlier failed tries of these groups


@dataclass(frozen=True)
class Group:
    """The n samples of one prompt, sampled and waiting to be scored."""

    step: int
    rollouts: tuple[Rollout, ...]
    sampler: str
    attempt: int


def chunk_seed(run_seed: int, chunk: Chunk) -> int:
    """The seed of a chunk's first prompt (prompt i of the chunk uses seed + i)."""
    return run_seed * 1_000_003 + chunk.step * 1009 + chunk.first


def share(rate: float, ready_rates: list[float], prompts_per_step: int, fixed: int = 0) -> int:
    """Prompt groups a sampler of speed ``rate`` takes at once (at least 1).

    ready_rates: the speeds of the ready samplers, its own included (0 = not yet measured; an
    unmeasured sampler counts as the mean of the measured ones, all as equal when none is).
    One sampler takes the whole step as one engine batch and two equal ones half each.
    """
    if fixed:
        return fixed
    rates = ready_rates or [rate]
    known = [r for r in rates if r > 0]
    default = sum(known) / len(known) if known else 1.0
    speeds = [r if r > 0 else default for r in rates]
    mine = rate if rate > 0 else default
    part = mine / sum(speeds) * prompts_per_step
    # The fastest rounds up and the others down, so a slow sampler's last group never
    # outlasts the fast one's whole share (the step ends with its slowest chunk).
    return max(1, math.ceil(part - 1e-9) if mine >= max(speeds) else math.floor(part))


def runs(positions: list[int]) -> list[list[int]]:
    """Split sorted positions into runs of consecutive ones ([0, 1, 3] → [[0, 1], [3]])."""
    out: list[list[int]] = []
    for p in positions:
        if out and out[-1][-1] == p - 1:
            out[-1].append(p)
        else:
            out.append([p])
    return out


def may_open(
    *, live: int, admitted: bool, in_flight: int, step_samples: int, capacity: int
) -> bool:
    """Whether the next step's prompts may be handed out now.

    live: samplers that hold weights; admitted: one of them serves (or is loading) a version
    allowed to sample the step; in_flight: samples of opened steps not yet taken by the
    learner (channel included). An empty pipeline admits any step, so none can deadlock.
    """
    room = not in_flight or in_flight + step_samples <= capacity
    return live > 0 and admitted and room


class Scheduler:
    """The two queues of the rollout tier: prompt groups to sample, sampled groups to score."""

    def __init__(self, prompts_per_step: int, fixed_groups: int = 0) -> None:
        self.prompts_per_step = prompts_per_step
        self.fixed_groups = fixed_groups
        self.queue: deque[Chunk] = deque()
        self.unscored: deque[Group] = deque()

    # ------------------------------------------------------------------ sampling

    def open_step(self, step: int, items: list[WorkItem]) -> None:
        self.queue.append(Chunk(step, 0, tuple(items)))

    def take_chunk(
        self, rate: float, ready_rates: list[float], may_take: Callable[[int], bool]
    ) -> Chunk | None:
        """The next chunk for a free sampler of speed ``rate``: its share cut off the first
        queued chunk of a step it may sample (``may_take(step)``), or None."""
        chunk = next((c for c in self.queue if may_take(c.step)), None)
        if chunk is None:
            return None
        take = share(rate, ready_rates, self.prompts_per_step, self.fixed_groups)
        at = self.queue.index(chunk)
        if len(chunk.items) > take:
            rest = Chunk(chunk.step, chunk.first + take, chunk.items[take:], chunk.attempt)
            self.queue[at] = rest
            return Chunk(chunk.step, chunk.first, chunk.items[:take], chunk.attempt)
        del self.queue[at]
        return chunk

    def requeue_chunk(self, chunk: Chunk, done: set[int]) -> int:
        """Hand back the positions of ``chunk`` not in ``done`` (a dead sampler's); returns
        how many groups."""
        todo = [i for i in range(len(chunk.items)) if i not in done]
        for run in reversed(runs(todo)):
            self.queue.appendleft(
                Chunk(
                    chunk.step,
                    chunk.first + run[0],
                    tuple(chunk.items[i] for i in run),
                    attempt=chunk.attempt + 1,
                )
            )
        return len(todo)

    @property
    def queued_groups(self) -> int:
        return sum(len(c.items) for c in self.queue)

    # ------------------------------------------------------------------ scoring

    def sampled(self, group: Group) -> None:
        self.unscored.append(group)

    def take_groups(
        self, ready_scorers: int, accepts: Callable[[Group], bool] | None = None
    ) -> list[Group]:
        """Sampled groups for one idle scorer's call: those waiting, up to its part of a step
        (``ready_scorers`` share a step); with ``accepts``, only the groups it accepts (a
        scorer of one of several teachers: services/teachers.py), the others keep their
        place."""
        cap = max(1, math.ceil(self.prompts_per_step / max(1, ready_scorers)))
        if accepts is None:
            return [self.unscored.popleft() for _ in range(min(cap, len(self.unscored)))]
        taken = [g for g in self.unscored if accepts(g)][:cap]
        for g in taken:
            self.unscored.remove(g)
        return taken

    def requeue_groups(self, groups: list[Group]) -> int:
        """Hand back a dead scorer's groups to the front, in order; returns how many."""
        for g in reversed(groups):
            self.unscored.appendleft(Group(g.step, g.rollouts, g.sampler, g.attempt + 1))
        return len(groups)
