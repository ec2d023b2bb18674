"""The rollout tier as the driver sees it: build the pools, start the producer, talk through
the channel.

prompts → pool of StudentSamplers (one Rollout group per finished prompt) → pool of
TeacherScorers → bounded channel → ``next_batch``. Who owns what:

- ``rollout.sampler`` / ``rollout.scorer``: the work (plain objects; ``services.actors`` wraps
  them in Ray actors);
- ``services.pool``: membership, health, restarts, resize;
- ``services.publisher``: policy versions and weight transport (version arithmetic);
- ``services.producer``: the one loop (dispatch, re-dispatch, admission control);
- ``services.channel``: the only state shared between the producer thread and the driver.

``in_process=True`` runs the same producer over plain objects in this process (no actors, no
restarts): step through a real run with a debugger.
"""

from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout

from rollout.records import ScoredRollout
from rollout.sampler import Faults, Sampler
from rollout.scorer import Scorer
from services.channel import Channel, Provenance, RolloutError, RolloutTimes
from services.pool import LocalCalls, Pool, RayCalls, WorkerFailed, short_error
from services.producer import Producer, RolloutPlan, response_crc
from services.publisher import Publisher, WeightSyncError

__all__ = [
    "RolloutError",
    "RolloutPlan",
    "RolloutService",
    "RolloutTimes",
    "WeightSyncError",
    "WorkerFailed",
]

SAMPLER_PREFIX, SCORER_PREFIX = "student-sampler", "teacher-scorer"


class _LocalSampler:
    """In-process stand-in for the StudentSampler actor: the same method names, no Ray."""

    def __init__(self, settings, faults) -> None:
        self.sampler = Sampler.build(settings, faults)

    def version(self) -> int:
        return self.sampler.version

    def sample_stream(self, items, req):
        yield from self.sampler.sample(items, req)

    def load_weights(self, named_tensors, version: int):
        return self.sampler.load_weights(named_tensors, version)

    def generate(self, prompt_ids, **kwargs):
        return self.sampler.generate(prompt_ids, **kwargs)

    def close(self) -> None:
        self.sampler.close()


class _LocalScorer:
    def __init__(self, settings, faults) -> None:
        self.scorer = Scorer.build(settings, faults)

    def ready(self) -> bool:
        return True

    def score(self, rollouts):
        return self.scorer.score(rollouts)

    def close(self) -> None:
        self.scorer.close()


def _actor_factory(cls, settings, resources: dict, faults):
    from services.actors import actor_options
    from services.cluster import actor_name

    def make(name: str, slot: int):
        del slot
        # actor_name suffixes the name while a killed predecessor still holds it.
        return cls.options(**actor_options(actor_name(name), resources)).remote(settings, faults)

    return make


class RolloutService:
    """Owns the producer thread; every other call is a message through the channel."""

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
        in_process: bool = False,
        control_name: str | None = None,
        sampler_faults: dict[int, Faults] | None = None,
        scorer_faults: dict[int, Faults] | None = None,
    ) -> None:
        """control_name: name of the control actor ``opdplus scale`` talks to (none if None or
        in-process). sampler_faults / scorer_faults: test-only faults per slot."""
        self.plan = plan
        self.in_process = in_process
        self.calls = LocalCalls() if in_process else RayCalls()
        sf, cf = sampler_faults or {}, scorer_faults or {}
        if in_process:
            make_s = lambda name, slot: _LocalSampler(student_settings, sf.get(slot))  # noqa: E731
            make_c = lambda name, slot: _LocalScorer(teacher_settings, cf.get(slot))  # noqa: E731
        else:
            from services.actors import StudentSampler, TeacherScorer

            make_s = _slot_faults(StudentSampler, student_settings, sampler_resources, sf)
            make_c = _slot_faults(TeacherScorer, teacher_settings, scorer_resources, cf)
        restarts = 0 if in_process else plan.max_restarts
        self._samplers = Pool(
            "sampler", SAMPLER_PREFIX, make_s, "version", max_restarts=restarts, calls=self.calls
        )
        self._scorers = Pool(
            "scorer", SCORER_PREFIX, make_c, "ready", max_restarts=restarts, calls=self.calls
        )
        self._samplers.resize(num_samplers)
        self._scorers.resize(num_scorers)
        # Surface engine start-up errors here, not at the first batch.
        try:
            for pool in (self._samplers, self._scorers):
                for w in pool.workers:
                    answer = self.calls.get(pool.ping(w))
                    w.version = int(answer) if pool is self._samplers else 0
                    w.state = "ready"
        except BaseException as exc:
            for w in self._samplers.workers + self._scorers.workers:
                self.calls.kill(w.handle)
            if isinstance(exc, Exception) and self.calls.is_death(exc):
                raise RolloutError(f"a rollout worker did not start: {short_error(exc)}") from exc
            raise
        self._channel = Channel(plan.channel_capacity)
        publisher = Publisher(
            self.calls, max_staleness=plan.max_staleness, sync_timeout_s=plan.sync_timeout_s
        )
        self._control = None
        if control_name and not in_process:
            from services.control import start_control

            self._control = start_control(control_name)
        self._producer = Producer(
            self._samplers,
            self._scorers,
            publisher,
            self._channel,
            plan,
            self.calls,
            self._control,
        )
        self._thread = threading.Thread(target=self._producer.run, daemon=True, name="producer")
        self._thread.start()
        self.last_provenance: list[Provenance] = []

    # ------------------------------------------------------------------ driver side

    def _ask(self, kind: str, *args, timeout: float | None = None):
        try:
            return self._channel.send(kind, *args).result(timeout)
        except FutureTimeout:
            raise RolloutError(f"rollout producer did not answer {kind!r} in {timeout} s") from None

    def start(self, source, encode, *, first_step: int, last_step: int) -> None:
        """Produce batches first_step..last_step from ``source`` in the background.

        encode: prompt text → token ids (the one helper shared with evaluation).
        """
        self._ask("produce", source, encode, first_step, last_step)

    def next_batch(self, step: int, timeout: float | None = None) -> list[ScoredRollout]:
        """Block until every sample of ``step`` is scored; returns them sorted by sample id.
        Their provenance (same order) is in ``last_provenance``."""
        n = self.plan.prompts_per_step * self.plan.samples_per_prompt
        pairs = sorted(self._channel.take(step, n, timeout), key=lambda p: p[0].sample_id)
        self.last_provenance = [p for _, p in pairs]
        return [s for s, _ in pairs]

    def ledger_columns(self, batch: list[ScoredRollout]) -> dict[str, list]:
        """Per-sample ledger columns of the last batch (same order as ``batch``)."""
        prov = self.last_provenance
        return {
            "samplers": [p.sampler for p in prov],
            "scorers": [p.scorer for p in prov],
            "attempts": [p.attempt for p in prov],
            "response_crc": [response_crc(s.rollout) for s in batch],
        }

    def source_state_before(self, step: int) -> dict | None:
        """The prompt source's state just before the batch for ``step`` (known once step − 1's
        batch has been drawn)."""
        return self._channel.source_state(step)

    def take_times(self) -> RolloutTimes:
        return self._channel.take_times()

    def worker_metrics(self) -> dict:
        """Per-worker samples / restarts / re-dispatched groups and the channel depth (numbers
        only, for metrics.jsonl)."""
        return {k: v for k, v in self._channel.stats().items() if isinstance(v, (int, float))}

    def tier_state(self) -> dict:
        """The producer's last snapshot, worker states included (for tools and errors)."""
        return self._channel.stats()

    def deaths(self):
        """Worker deaths recovered from so far (read after ``stop`` or for tests)."""
        return list(self._producer.deaths)

    # ------------------------------------------------------------------ weights

    def push_weights(self, named_tensors: list, version: int, *, wait: bool = False) -> None:
        """Publish weights (named HF tensors) as ``version``; samplers load them after their
        current chunk. A load unfinished after ``sync_timeout_s`` fails the run with
        WeightSyncError. ``wait=True`` blocks until every live sampler serves it."""
        self._ask("publish", self.calls.put(named_tensors), version)
        if wait:
            self.wait_for_push()

    def wait_for_push(self) -> None:
        """Block until the last published weights are served (or WeightSyncError)."""
        self._ask("wait_push")

    def mark_served(self, version: int) -> None:
        """Record a version delivered by another path (NCCL broadcast)."""
        self._ask("mark_served", version)

    @property
    def served_version(self) -> int:
        return min(self.sampler_versions())

    def sampler_versions(self) -> list[int]:
        return self._ask("versions")

    @property
    def samplers(self) -> list:
        """Handles of the live samplers now (for NCCL set-up and tools)."""
        return self._ask("handles")

    def worker_handle(self, name: str):
        """The current handle of pool worker ``name`` (e.g. ``student-sampler-0``), or None."""
        return self._ask("handle", name)

    def scale(self, *, samplers: int | None = None, scorers: int | None = None) -> None:
        self._ask("scale", samplers, scorers)

    def eval_engine(self):
        """An engine-like object (``generate``) on a live sampler's current weights."""
        return _EvalEngine(self)

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        self._channel.close()
        self._thread.join(timeout=30)
        if self._control is not None:
            self.calls.kill(self._control)


def _slot_faults(cls, settings, resources, faults: dict):
    makers = {}

    def make(name: str, slot: int):
        if slot not in makers:
            makers[slot] = _actor_factory(cls, settings, resources, faults.get(slot))
        return makers[slot](name, slot)

    return make


class _EvalEngine:
    """Lets rollout.accuracy drive a sampler (current weights) as if it were a local engine.

    In-process, the call runs on the producer thread (vLLM engines are not thread-safe); with
    actors it goes straight to a live sampler and is retried on another if that one dies.
    """

    def __init__(self, service: RolloutService) -> None:
        self.service = service

    def generate(self, prompt_ids, **kwargs):
        svc = self.service
        if svc.in_process:
            return svc._ask("generate", prompt_ids, kwargs)
        last: BaseException | None = None
        for _ in range(3):
            handles = svc.samplers
            if not handles:
                break
            try:
                return svc.calls.get(handles[0].generate.remote(prompt_ids, **kwargs))
            except Exception as exc:
                if not svc.calls.is_death(exc):
                    raise
                last = exc
        raise RolloutError(f"evaluation found no live sampler: {last}")
