"""How the producer calls workers, and its records of the calls outstanding.

Two backends with one interface (``call``, ``wait``, ``get``, ``next``, ``put``, ``kill``,
``is_death``): ``RayCalls`` drives Ray actors through ``ray.wait``; ``LocalCalls`` runs plain
objects in this thread (the in-process mode: step through a real run with a debugger).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from services.pool import Worker
from services.scheduler import Chunk, Group


class CallTimeout(RuntimeError):
    """A worker missed a call's deadline: the producer treats it as dead (kills it, restarts it,
    hands its work out again), like a worker whose process died."""


class LearnerTimeout(RuntimeError):
    """A learner rank missed its deadline (learner.step_timeout_s): the driver stops the run
    with the resume command (a rank cannot be replaced mid-collective)."""


@dataclass(frozen=True)
class Deadlines:
    """Seconds a call may take before its worker counts as hung (0 = no deadline)."""

    call_s: float = 0.0  # a sample call without a finished prompt group; a score call
    start_s: float = 0.0  # a (re)started worker's first answer (placement + engine start)
    load_s: float = 0.0  # a weight load


def overdue(task, now: float, limits: Deadlines) -> str | None:
    """Why ``task`` (a call record below) has missed its deadline at ``now``, or None."""
    if isinstance(task, Sample):
        limit, since, what, key = limits.call_s, task.seen, "finished no prompt group", "call"
    elif isinstance(task, Score):
        limit, since, what, key = limits.call_s, task.t0, "did not finish scoring", "call"
    elif isinstance(task, Ping):
        limit, since, what, key = limits.start_s, task.t0, "did not start", "start"
    elif isinstance(task, Load):
        limit, since, what, key = limits.load_s, task.t0, "did not load its weights", "load"
    elif isinstance(task, Poll):
        limit, since = limits.call_s, task.t0
        return "control actor did not answer" if limit and now - since > limit else None
    else:
        return None
    if not limit or now - since <= limit:
        return None
    setting = {
        "call": "rollout.call_timeout_s",
        "start": "ray.placement_timeout_s",
        "load": "rollout.sync_timeout_s",
    }[key]
    return f"{task.worker.name} {what} in {now - since:.0f} s ({setting} = {limit:g}): hung"


def is_worker_death(exc: BaseException) -> bool:
    """True when ``exc`` says a Ray worker process died (not an error raised by its code)."""
    import sys

    if "ray" not in sys.modules:  # nothing Ray could have raised
        return False
    return RayCalls().is_death(exc)


class RayCalls:
    """Actor calls through Ray: ``ray.wait`` over object refs and streaming generators."""

    local = False

    def __init__(self) -> None:
        import ray

        self.ray = ray
        self._death = (
            ray.exceptions.RayActorError,
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.OutOfMemoryError,
            ray.exceptions.ObjectLostError,
        )

    def call(self, handle, method: str, *args, streaming: bool = False, **kwargs):
        fn = getattr(handle, method)
        if streaming:
            fn = fn.options(num_returns="streaming")
        return fn.remote(*args, **kwargs)

    def wait(self, waitables: list, timeout: float) -> list:
        if not waitables:
            return []
        ready, rest = self.ray.wait(waitables, num_returns=1, timeout=timeout)
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def get(self, ref, timeout: float | None = None):
        """The call's result; CallTimeout when ``timeout`` (seconds) passes first."""
        try:
            return self.ray.get(ref, timeout=timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise CallTimeout(f"no answer within {timeout:g} s") from None

    def next(self, stream):
        """The next item of a streaming call; StopIteration when it has ended."""
        return self.ray.get(next(stream))

    def put(self, value):
        return self.ray.put(value)

    def kill(self, handle) -> None:
        with contextlib.suppress(Exception):  # already gone: nothing to stop
            self.ray.kill(handle, no_restart=True)

    def is_death(self, exc: BaseException) -> bool:
        return isinstance(exc, (*self._death, CallTimeout))


class _Done:
    """A finished in-process call (value or error)."""

    def __init__(self, fn, args, kwargs) -> None:
        self.value, self.error = None, None
        try:
            self.value = fn(*args, **kwargs)
        except Exception as exc:  # re-raised by LocalCalls.get, like ray.get would
            self.error = exc


class _Stream:
    def __init__(self, gen) -> None:
        self.gen = gen


class LocalCalls:
    """Plain method calls in this thread: every call is 'ready' when the producer looks."""

    local = True

    def call(self, handle, method: str, *args, streaming: bool = False, **kwargs):
        fn = getattr(handle, method)
        return _Stream(fn(*args, **kwargs)) if streaming else _Done(fn, args, kwargs)

    def wait(self, waitables: list, timeout: float) -> list:
        return list(waitables)

    def get(self, done: _Done, timeout: float | None = None):
        if done.error is not None:
            raise done.error
        return done.value

    def next(self, stream: _Stream):
        return next(stream.gen)

    def put(self, value):
        return value

    def kill(self, handle) -> None:
        close = getattr(handle, "close", None)
        if callable(close):
            close()

    def is_death(self, exc: BaseException) -> bool:
        return False


# ------------------------------------------------------------------------------ call records


# One outstanding call each; ``gen`` is the worker's restart count at submission, so the
# results of a replaced worker are void.
@dataclass(eq=False)
class Call:
    worker: Worker
    gen: int
    t0: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class Ping(Call):
    pass


@dataclass(eq=False)
class Load(Call):
    version: int = 0


@dataclass(eq=False)
class Sample(Call):
    chunk: Chunk | None = None
    received: set = field(default_factory=set)
    seen: float = field(default_factory=time.perf_counter)  # when it last sent a group


@dataclass(eq=False)
class Score(Call):
    groups: list[Group] = field(default_factory=list)


@dataclass(eq=False)
class Poll:
    """A pending read of the control actor's resize target."""

    t0: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Death:
    """A worker death the producer recovered from."""

    at: float  # perf_counter seconds
    worker: str
    groups: int  # prompt groups handed out again
    error: str
