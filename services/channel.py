"""The bounded channel: the only state the producer thread shares with the driver thread.

Data flows one way (scored samples, keyed by step, producer → learner, handed over as one
``Batch``) and typed messages the other (services/messages.py; driver → producer). The producer
also leaves snapshots here (rollout times, per-worker counters), so the driver never reads the
producer's own objects.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from rollout.records import ScoredRollout
from services.errors import UserError
from services.messages import Message


class RolloutError(UserError, RuntimeError):
    """The rollout producer failed; the message carries the original error."""


class StepTimeout(RolloutError):
    """The step watchdog: a step's samples did not all arrive within rollout.step_timeout_s."""


@dataclass(frozen=True)
class Provenance:
    """Where one sample came from (a row of the ledger, ``samples.jsonl``)."""

    sampler: str
    scorer: str
    attempt: int  # 1 + earlier failed tries of its prompt group (sampling or scoring)
    teacher: str = ""  # the teacher that scored it (its [[teachers]] name; services/teachers.py)


@dataclass(frozen=True)
class Batch:
    """Every scored sample of one step, sorted by sample id, with where each came from and
    where the prompt source stands after the step's prompts were drawn (what a checkpoint
    after this step must save to resume at the next one)."""

    step: int
    samples: list[ScoredRollout]
    provenance: list[Provenance]  # same order as samples
    source_state: dict | None

    def __post_init__(self) -> None:
        if len(self.samples) != len(self.provenance):
            raise ValueError(
                f"step {self.step}: {len(self.samples)} samples, {len(self.provenance)} provenances"
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)


@dataclass
class RolloutTimes:
    """Seconds spent per role, accumulated since the last ``take_times``."""

    sample: float = 0.0
    score: float = 0.0
    producer_wait: float = 0.0
    samples: int = 0


@dataclass(frozen=True)
class Command:
    """A message from the driver thread; the producer answers through ``reply``."""

    message: Message
    reply: Future = field(default_factory=Future)


class Channel:
    """Bounded buffer of scored samples keyed by step, plus the driver → producer inbox."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_step: dict[int, list[tuple[ScoredRollout, Provenance]]] = defaultdict(list)
        self._count = 0
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._closed = False
        self._inbox: deque[Command] = deque()
        self._times = RolloutTimes()
        self._stats: dict[str, Any] = {}
        self._source_states: dict[int, dict] = {}

    # -------------------------------------------------------------- producer side

    def room(self) -> int:
        """Samples that fit now; an empty buffer takes any chunk (so none can deadlock)."""
        with self._cond:
            return self.capacity - self._count if self._count else max(self.capacity, 1 << 30)

    def put(self, step: int, items: list[tuple[ScoredRollout, Provenance]]) -> None:
        """Never blocks: the producer checks ``room`` first and keeps what does not fit."""
        with self._cond:
            self._by_step[step].extend(items)
            self._count += len(items)
            self._cond.notify_all()

    def depth(self) -> int:
        with self._cond:
            return self._count

    def commands(self, timeout: float = 0.0) -> list[Command]:
        """Pending commands (waits up to ``timeout`` for one when there is none)."""
        with self._cond:
            if not self._inbox and timeout > 0 and not self._closed:
                self._cond.wait(timeout)
            out = list(self._inbox)
            self._inbox.clear()
            return out

    def add_times(self, **seconds: float) -> None:
        with self._cond:
            for k, v in seconds.items():
                setattr(self._times, k, getattr(self._times, k) + v)

    def set_stats(self, stats: dict[str, Any]) -> None:
        with self._cond:
            self._stats = dict(stats)

    def set_source_state(self, step: int, state: dict) -> None:
        """Where the prompt source stands once ``step``'s prompts are drawn."""
        with self._cond:
            self._source_states[step] = state

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            for cmd in self._inbox:
                cmd.reply.set_exception(RolloutError(f"rollout producer failed: {exc}"))
            self._inbox.clear()
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    # -------------------------------------------------------------- driver side

    def take(self, step: int, n: int, timeout: float | None) -> Batch:
        """Block until ``n`` samples of ``step`` are in; returns them as one Batch."""
        with self._cond:
            ok = self._cond.wait_for(
                lambda: self._error is not None or len(self._by_step.get(step, ())) >= n, timeout
            )
            if self._error is not None:
                raise RolloutError(f"rollout producer failed: {self._error}") from self._error
            if not ok:
                have = len(self._by_step.get(step, ()))
                state = {
                    k: v
                    for k, v in self._stats.items()
                    if k.startswith("rollout/") or k.endswith("/state")
                }
                raise StepTimeout(
                    f"waited {timeout:.0f} s (rollout.step_timeout_s) for the samples of step "
                    f"{step}: {have} of {n} arrived (rollout tier: {state})"
                )
            items = sorted(self._by_step.pop(step), key=lambda p: p[0].sample_id)
            self._count -= len(items)
            state = self._source_states.pop(step, None)
            self._cond.notify_all()
        return Batch(step, [s for s, _ in items], [p for _, p in items], state)

    def send(self, message: Message) -> Future:
        cmd = Command(message)
        with self._cond:
            if self._error is not None:
                cmd.reply.set_exception(RolloutError(f"rollout producer failed: {self._error}"))
            elif self._closed:
                cmd.reply.set_exception(RolloutError("rollout service is stopped"))
            else:
                self._inbox.append(cmd)
                self._cond.notify_all()
        return cmd.reply

    def take_times(self) -> RolloutTimes:
        with self._cond:
            times, self._times = self._times, RolloutTimes()
            return times

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return dict(self._stats)

    def error(self) -> BaseException | None:
        with self._cond:
            return self._error

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for cmd in self._inbox:
                cmd.reply.set_exception(RolloutError("rollout service is stopped"))
            self._inbox.clear()
            self._cond.notify_all()
