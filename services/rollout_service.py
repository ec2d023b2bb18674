"""The rollout side of the pipeline as the driver sees it.

prompts → StudentSampler streams (one Rollout group per finished prompt) → TeacherScorer
(scored as soon as it arrives) → a bounded channel → the learner's ``next_batch``.

Admission control: the producer starts the batch for step k only once every sampler serves
policy version ≥ k − 1 − max_staleness (version = learner steps done), so no sample is ever
more than ``max_staleness`` versions behind the learner that trains on it, and nothing is
dropped. ``max_staleness = 0`` makes the pipeline strictly on-policy.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray

from rollout.records import ScoredRollout
from services.actors import StudentSampler, TeacherScorer, WorkItem
from services.errors import UserError


class WeightSyncError(UserError, RuntimeError):
    """A weight push did not complete in time (or a sampler failed while loading)."""


class RolloutError(UserError, RuntimeError):
    """The rollout producer failed; the message carries the original error."""


@dataclass(frozen=True)
class RolloutPlan:
    """What to sample each step (plain values taken from the config by the driver)."""

    prompts_per_step: int
    samples_per_prompt: int
    max_tokens: int
    temperature: float
    max_staleness: int
    channel_capacity: int
    sync_timeout_s: float
    seed: int


@dataclass
class RolloutTimes:
    """Seconds spent per role, accumulated since the last ``take_times``."""

    sample: float = 0.0
    score: float = 0.0
    producer_wait: float = 0.0
    samples: int = 0


class _Channel:
    """Bounded buffer of scored samples keyed by step; ``put`` blocks when full."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.by_step: dict[int, list[ScoredRollout]] = defaultdict(list)
        self.count = 0
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.closed = False

    def put(self, step: int, items: list[ScoredRollout]) -> None:
        with self.cond:
            # An empty buffer always admits, so a chunk larger than the capacity cannot deadlock.
            self.cond.wait_for(
                lambda: self.closed or self.count == 0 or self.count + len(items) <= self.capacity
            )
            self.by_step[step].extend(items)
            self.count += len(items)
            self.cond.notify_all()

    def take(self, step: int, n: int, timeout: float | None) -> list[ScoredRollout]:
        with self.cond:
            ok = self.cond.wait_for(
                lambda: self.error is not None or len(self.by_step.get(step, ())) >= n, timeout
            )
            if self.error is not None:
                raise RolloutError(f"rollout producer failed: {self.error!r}") from self.error
            if not ok:
                have = len(self.by_step.get(step, ()))
                raise RolloutError(f"step {step}: only {have}/{n} samples after {timeout:.0f} s")
            items = self.by_step.pop(step)
            self.count -= len(items)
            self.cond.notify_all()
            return items

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            self.error = exc
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class RolloutService:
    """Owns the sampler and scorer actors, the producer thread and the weight pushes."""

    def __init__(
        self,
        *,
        student_settings,
        teacher_settings,
        num_samplers: int,
        num_scorers: int,
        sampler_resources: dict,
        scorer_resources: dict,
        plan: RolloutPlan,
    ) -> None:
        self.plan = plan
        self.samplers = [
            StudentSampler.options(name=None, **sampler_resources).remote(student_settings)
            for _ in range(num_samplers)
        ]
        self.scorers = [
            TeacherScorer.options(**scorer_resources).remote(teacher_settings)
            for _ in range(num_scorers)
        ]
        # Surface engine start-up errors here, not at the first batch.
        ray.get([s.version.remote() for s in self.samplers])
        ray.get([s.ready.remote() for s in self.scorers])
        self._scorer_cycle = itertools.cycle(self.scorers)
        self._scorer_lock = threading.Lock()
        self._channel = _Channel(plan.channel_capacity)
        self._version_cond = threading.Condition()
        self.served_version = 0
        self._pending_push: list | None = None
        self._push_lock = threading.RLock()
        self._push_started = 0.0
        self._push_version = 0
        self._times = RolloutTimes()
        self._times_lock = threading.Lock()
        self._source_states: dict[int, dict] = {}
        self.batches_started = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(2, num_samplers))

    # ------------------------------------------------------------------ producer

    def start(self, source, encode, *, first_step: int, last_step: int) -> None:
        """Start producing batches first_step..last_step from ``source`` in the background.

        encode: prompt text → token ids (the one helper shared with evaluation).
        """
        self.batches_started = first_step - 1
        self._thread = threading.Thread(
            target=self._produce, args=(source, encode, first_step, last_step), daemon=True
        )
        self._thread.start()

    def _produce(self, source, encode, first_step: int, last_step: int) -> None:
        try:
            for step in range(first_step, last_step + 1):
                t0 = time.perf_counter()
                self._wait_admission(step)
                if self._stop.is_set():
                    return
                problems = source.next_batch(self.plan.prompts_per_step)
                # The state after drawing batch k is where a run resumed after step k starts.
                self._source_states[step + 1] = source.state()
                self.batches_started = step
                items = [WorkItem(p.id, p.answer, tuple(encode(p.prompt))) for p in problems]
                waited = time.perf_counter() - t0
                self._produce_batch(step, items)
                with self._times_lock:
                    self._times.producer_wait += waited
        except BaseException as exc:  # handed to the learner thread, which raises it
            self._channel.fail(exc)

    def _wait_admission(self, step: int) -> None:
        need = step - 1 - self.plan.max_staleness
        while not self._stop.is_set():
            self._poll_push()
            with self._version_cond:
                if self.served_version >= need:
                    return
            pending = self._pending_push
            if pending:
                # Wake the moment the samplers finish loading, not on a polling tick.
                ray.wait(pending, num_returns=len(pending), timeout=0.2)
            else:
                with self._version_cond:
                    self._version_cond.wait(timeout=0.2)

    def _produce_batch(self, step: int, items: list[WorkItem]) -> None:
        n = len(self.samplers)
        chunks = [items[i::n] for i in range(n)]
        futures = [
            self._pool.submit(self._run_sampler, sampler, chunk, step, i)
            for i, (sampler, chunk) in enumerate(zip(self.samplers, chunks, strict=True))
            if chunk
        ]
        for f in futures:
            f.result()

    def _run_sampler(self, sampler, chunk: list[WorkItem], step: int, index: int) -> None:
        p = self.plan
        t0 = time.perf_counter()
        gen = sampler.sample_stream.options(num_returns="streaming").remote(
            chunk,
            n=p.samples_per_prompt,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            seed=p.seed * 1_000_003 + step * 1009 + index,
        )
        # Each finished prompt group goes to a scorer at once; the scorer works while the
        # sampler keeps generating. Results are collected in order once the stream ends.
        pending = []
        for ref in gen:
            with self._scorer_lock:
                scorer = next(self._scorer_cycle)
            pending.append(scorer.score.remote(ref))
        sample_s = time.perf_counter() - t0
        score_s = 0.0
        for ref in pending:
            scored, seconds = ray.get(ref)
            score_s += seconds
            self._channel.put(step, scored)
        with self._times_lock:
            self._times.sample += sample_s
            self._times.score += score_s
            self._times.samples += len(chunk) * p.samples_per_prompt

    # ------------------------------------------------------------------ consumer

    def next_batch(self, step: int, timeout: float | None = None) -> list[ScoredRollout]:
        """Block until every sample of ``step`` is scored; returns them sorted by sample id."""
        n = self.plan.prompts_per_step * self.plan.samples_per_prompt
        self._poll_push()
        items = self._channel.take(step, n, timeout)
        return sorted(items, key=lambda s: s.sample_id)

    def source_state_before(self, step: int) -> dict | None:
        """The prompt source's state just before the batch for ``step`` (known once step − 1's
        batch has been drawn)."""
        return self._source_states.get(step)

    def take_times(self) -> RolloutTimes:
        with self._times_lock:
            times, self._times = self._times, RolloutTimes()
        return times

    # ------------------------------------------------------------------ weights

    def push_weights(self, named_tensors: list, version: int, *, wait: bool = False) -> None:
        """Send weights (named HF tensors) to every sampler through the object store.

        Asynchronous: samplers load them after their current batch; ``served_version``
        advances when all have loaded. A push still unfinished after ``sync_timeout_s``
        raises WeightSyncError at the next call. ``wait=True`` blocks until loaded.
        """
        self._finish_push(block=True)
        ref = ray.put(named_tensors)
        with self._push_lock:
            self._pending_push = [s.load_weights.remote(ref, version) for s in self.samplers]
            self._push_started = time.perf_counter()
            self._push_version = version
        if wait:
            self._finish_push(block=True)

    def wait_for_push(self) -> None:
        """Block until the last pushed weights are served (or WeightSyncError)."""
        self._finish_push(block=True)

    def _poll_push(self) -> None:
        self._finish_push(block=False)

    def _finish_push(self, *, block: bool) -> None:
        with self._push_lock:
            self._finish_push_locked(block=block)

    def _finish_push_locked(self, *, block: bool) -> None:
        pending = self._pending_push
        if not pending:
            return
        elapsed = time.perf_counter() - self._push_started
        remaining = max(0.0, self.plan.sync_timeout_s - elapsed)
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=remaining if block else 0)
        if len(ready) < len(pending):
            if block or elapsed > self.plan.sync_timeout_s:
                raise WeightSyncError(
                    f"weight push of version {self._push_version} did not complete on "
                    f"{len(pending) - len(ready)}/{len(pending)} samplers within "
                    f"{self.plan.sync_timeout_s:.0f} s (rollout.sync_timeout_s)"
                )
            return
        versions = [v for v, _ in ray.get(pending)]
        self._pending_push = None
        with self._version_cond:
            self.served_version = min(versions)
            self._version_cond.notify_all()

    def mark_served(self, version: int) -> None:
        """Record a version delivered by another path (NCCL broadcast)."""
        with self._version_cond:
            self.served_version = version
            self._version_cond.notify_all()

    def sampler_versions(self) -> list[int]:
        return ray.get([s.version.remote() for s in self.samplers])

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        self._stop.set()
        self._channel.close()
        with self._version_cond:
            self._version_cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for actor in self.samplers + self.scorers:
            ray.kill(actor)
