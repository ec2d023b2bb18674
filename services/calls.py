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

    def get(self, ref):
        return self.ray.get(ref)

    def next(self, stream):
        """The next item of a streaming call; StopIteration when it has ended."""
        return self.ray.get(next(stream))

    def put(self, value):
        return self.ray.put(value)

    def kill(self, handle) -> None:
        with contextlib.suppress(Exception):  # already gone: nothing to stop
            self.ray.kill(handle, no_restart=True)

    def is_death(self, exc: BaseException) -> bool:
        return isinstance(exc, self._death)


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

    def get(self, done: _Done):
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


@dataclass(eq=False)
class Score(Call):
    groups: list[Group] = field(default_factory=list)


@dataclass(eq=False)
class Poll:
    """A pending read of the control actor's resize target."""


@dataclass(frozen=True)
class Death:
    """A worker death the producer recovered from."""

    at: float  # perf_counter seconds
    worker: str
    groups: int  # prompt groups handed out again
    error: str
