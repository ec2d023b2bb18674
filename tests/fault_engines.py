"""Faults injected from outside production code: an engine spec that wraps the real engines.

``FaultSpec(inner, ...)`` is passed where production passes ``EngineSettings``; the sampler and
scorer actors build their engine through it (``student_engine()`` / ``teacher_engine()``), so
real vLLM engines run with a fault around them. A fault applies to the actors whose Ray name
starts with ``target`` (e.g. ``student-sampler-0``; a replacement keeps the name), and is
switched by files the test creates or removes, so the test decides when it happens:

- ``gate_file``: while it exists, the targeted worker blocks before it samples (a stream, or
  an episode's turn) or scores —
  it holds its work until the test kills it (no delay window to race against);
- ``fail_start_file``: while it exists, the targeted worker refuses to start (a crash loop).

Ray workers unpickle the spec without tests/ on their path, so this module is pickled by value.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import ray.cloudpickle

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _targeted(prefix: str) -> bool:
    import ray

    name = ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None
    return bool(prefix) and (name or "").startswith(prefix)


def _hold(gate_file: str) -> None:
    while gate_file and os.path.exists(gate_file):
        time.sleep(0.05)


class _GatedStudent:
    def __init__(self, engine, gate_file: str) -> None:
        self._engine, self._gate = engine, gate_file

    def generate_stream(self, *args, **kwargs):
        _hold(self._gate)
        yield from self._engine.generate_stream(*args, **kwargs)

    def generate(self, *args, **kwargs):  # episodes' turns (rollout/episodes.py)
        _hold(self._gate)
        return self._engine.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


class _GatedTeacher:
    def __init__(self, engine, gate_file: str) -> None:
        self._engine, self._gate = engine, gate_file

    def score(self, *args, **kwargs):
        _hold(self._gate)
        return self._engine.score(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@dataclass(frozen=True)
class FaultSpec:
    inner: object  # rollout.engine.EngineSettings
    target: str = ""
    gate_file: str = ""
    fail_start_file: str = ""

    def _start(self) -> bool:
        hit = _targeted(self.target)
        if hit and self.fail_start_file and os.path.exists(self.fail_start_file):
            raise RuntimeError(f"injected start-up fault ({self.fail_start_file} exists)")
        return hit

    def student_engine(self):
        hit = self._start()
        engine = self.inner.student_engine()
        return _GatedStudent(engine, self.gate_file) if hit and self.gate_file else engine

    def teacher_engine(self):
        hit = self._start()
        engine = self.inner.teacher_engine()
        return _GatedTeacher(engine, self.gate_file) if hit and self.gate_file else engine
