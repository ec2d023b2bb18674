"""The rollout tier as the driver sees it: build the pools, start the producer, talk through
the channel.

prompts → pool of StudentSamplers (one Rollout group per finished prompt) → pool of
TeacherScorers → bounded channel → ``next_batch``. Who owns what:

- ``rollout.sampler`` / ``rollout.scorer``: the work (plain objects; ``services.actors`` wraps
  them in Ray actors);
- ``services.pool``: worker lifecycle (states), restarts, resize;
- ``services.scheduler``: who gets which work (pure: shares, chunks, re-dispatch, admission);
- ``services.versions``: policy versions and staleness (the one home of that arithmetic);
- ``services.producer``: the one loop over outstanding calls;
- ``services.channel``: the only state shared between the producer thread and the driver
  (scored samples out as one ``Batch`` per step, typed messages in: ``services.messages``).

``in_process=True`` runs the same producer over plain objects in this process (no actors, no
restarts): step through a real run with a debugger.
"""

from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from rollout.episodes import EpisodeSettings
from rollout.sampler import Sampler
from rollout.scorer import Scorer
from services import messages as m
from services.calls import CallTimeout, LocalCalls, RayCalls
from services.channel import Batch, Channel, RolloutError, RolloutTimes
from services.pool import Pool, WorkerFailed, short_error
from services.producer import Producer
from services.teachers import Routes, TeacherSpec
from services.versions import Versions, WeightSyncError

__all__ = [
    "Batch",
    "RolloutError",
    "RolloutPlan",
    "RolloutService",
    "RolloutTimes",
    "WeightSyncError",
    "WorkerFailed",
]

SAMPLER_PREFIX, SCORER_PREFIX = "student-sampler", "teacher-scorer"


@dataclass(frozen=True)
class RolloutPlan:
    """What to sample each step and how the rollout tier behaves (plain config values)."""

    prompts_per_step: int
    samples_per_prompt: int
    max_tokens: int
    temperature: float
    max_staleness: int
    channel_capacity: int
    sync_timeout_s: float
    seed: int
    max_restarts: int = 3
    dispatch_groups: int = 0  # prompt groups per chunk; 0 = by measured speed (scheduler.share)
    # Deadlines (seconds; 0 = none): a worker that misses one is treated as dead.
    call_timeout_s: float = 600.0  # rollout.call_timeout_s: sample (per group), score, generate
    start_timeout_s: float = 900.0  # ray.placement_timeout_s: placement + engine start
    step_timeout_s: float = 3600.0  # rollout.step_timeout_s: the driver's wait for one step
    episodes: EpisodeSettings | None = None  # task.environment: samples are episodes (issue 22)


class _LocalSampler:
    """In-process stand-in for the StudentSampler actor: the same method names, no Ray."""

    def __init__(self, spec) -> None:
        self.sampler = Sampler.build(spec)

    def version(self) -> int:
        return self.sampler.version

    def sample_stream(self, items, req):
        # Drained at the first ``next``, as an actor runs one call to its end before the next:
        # a lazy stream would leave requests in the engine that a ``generate`` (evaluation)
        # called between two ``next``s would step and collect.
        yield from list(self.sampler.sample(items, req))

    def load_weights(self, named_tensors, version: int):
        return self.sampler.load_weights(named_tensors, version)

    def generate(self, prompt_ids, **kwargs):
        return self.sampler.generate(prompt_ids, **kwargs)

    def close(self) -> None:
        self.sampler.close()


class _LocalScorer:
    def __init__(self, spec) -> None:
        self.scorer = Scorer.build(spec)

    def ready(self) -> bool:
        return True

    def score(self, rollouts):
        return self.scorer.score(rollouts)

    def generate(self, prompt_ids, **kwargs):
        return self.scorer.generate(prompt_ids, **kwargs)

    def close(self) -> None:
        self.scorer.close()


def _actor_factory(cls, spec, resources: dict):
    from services.actors import actor_options
    from services.cluster import actor_name

    def make(name: str, slot: int):
        del slot
        # actor_name suffixes the name while a killed predecessor still holds it.
        return cls.options(**actor_options(actor_name(name), resources)).remote(spec)

    return make


class RolloutService:
    """Owns the producer thread; every other call is a typed message through the channel."""

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
        teachers: list[TeacherSpec] | None = None,
    ) -> None:
        """student_settings / teacher_settings: ``rollout.engine.EngineSettings`` (any
        picklable spec whose ``student_engine()`` / ``teacher_engine()`` build the engines).
        control_name: name of the control actor ``opdplus scale`` talks to (none if None or
        in-process). teachers: several teachers (``services.teachers``; each prompt scored by
        its own), in place of teacher_settings / num_scorers / scorer_resources."""
        self.plan = plan
        self.in_process = in_process
        self.calls = LocalCalls() if in_process else RayCalls()
        self.routes = (
            None if teachers is None else Routes([(t.name, t.num_scorers) for t in teachers])
        )
        if teachers is None:
            teachers = [TeacherSpec("", teacher_settings, num_scorers, scorer_resources)]
        num_scorers = sum(t.num_scorers for t in teachers)
        slots = [t for t in teachers for _ in range(t.num_scorers)]  # services.teachers.Routes
        if in_process:
            make_s = lambda name, slot: _LocalSampler(student_settings)  # noqa: E731
            make_c = lambda name, slot: _LocalScorer(slots[slot % len(slots)].settings)  # noqa: E731
        else:
            from services.actors import StudentSampler, TeacherScorer

            make_s = _actor_factory(StudentSampler, student_settings, sampler_resources)
            per_teacher = {
                t.name: _actor_factory(TeacherScorer, t.settings, t.resources) for t in teachers
            }

            def make_c(name: str, slot: int):
                return per_teacher[slots[slot % len(slots)].name](name, slot)

        restarts = 0 if in_process else plan.max_restarts
        self._samplers = Pool(
            "sampler", SAMPLER_PREFIX, make_s, "version", max_restarts=restarts, calls=self.calls
        )
        self._scorers = Pool(
            "scorer", SCORER_PREFIX, make_c, "ready", max_restarts=restarts, calls=self.calls
        )
        if not in_process:
            from services.placement import KEYS, Ask, check_feasible, ray_resources, wait_started

            asks = [Ask("a sampler", KEYS["sampler"], ray_resources(sampler_resources))]
            asks += [
                Ask(f"a scorer of {t.name}" if t.name else "a scorer", KEYS["scorer"],
                    ray_resources(t.resources))
                for t in teachers
            ]  # fmt: skip
            # A role (a teacher's scorer) no node could ever hold fails before any engine starts.
            check_feasible(asks)
        self._samplers.resize(num_samplers)
        self._scorers.resize(num_scorers)
        # Surface engine start-up errors here, not at the first batch; an actor Ray cannot
        # place fails after ray.placement_timeout_s naming what it asked for.
        try:
            starting = [(p, w) for p in (self._samplers, self._scorers) for w in p.workers]
            refs = [pool.ping(w) for pool, w in starting]
            if in_process:
                answers = [self.calls.get(ref) for ref in refs]
            else:
                asks = [
                    Ask(
                        w.name,
                        KEYS[pool.role],
                        ray_resources(
                            sampler_resources
                            if pool is self._samplers
                            else slots[w.slot % len(slots)].resources
                        ),
                    )
                    for pool, w in starting
                ]
                answers = wait_started(refs, asks, timeout_s=plan.start_timeout_s)
            for (pool, w), answer in zip(starting, answers, strict=True):
                pool.started(w, answer)
                pool.synced(w)  # nothing is published yet: the initial weights are current
        except BaseException as exc:
            for w in self._samplers.workers + self._scorers.workers:
                self.calls.kill(w.handle)
            if isinstance(exc, Exception) and self.calls.is_death(exc):
                raise RolloutError(f"a rollout worker did not start: {short_error(exc)}") from exc
            raise
        self._channel = Channel(plan.channel_capacity)
        versions = Versions(
            self.calls, max_staleness=plan.max_staleness, sync_timeout_s=plan.sync_timeout_s
        )
        self._control = None
        if control_name and not in_process:
            from services.control import start_control

            self._control = start_control(control_name)
        self._producer = Producer(
            self._samplers,
            self._scorers,
            versions,
            self._channel,
            plan,
            self.calls,
            self._control,
            routes=self.routes,
        )
        self._teacher_greedy: dict = {}  # teacher_greedy's answers, kept for the service's life
        self._thread = threading.Thread(target=self._producer.run, daemon=True, name="producer")
        self._thread.start()

    # ------------------------------------------------------------------ driver side

    def _ask(self, message: m.Message, timeout: float | None = None):
        try:
            return self._channel.send(message).result(timeout)
        except FutureTimeout:
            raise RolloutError(
                f"rollout producer did not answer {type(message).__name__} in {timeout} s"
            ) from None

    def start(self, source, encode, *, first_step: int, last_step: int) -> None:
        """Produce batches first_step..last_step from ``source`` in the background.

        encode: prompt text → token ids (the one helper shared with evaluation).
        """
        self._ask(m.Produce(source, encode, first_step, last_step))

    def next_batch(self, step: int, timeout: float | None = None) -> Batch:
        """Block until every sample of ``step`` is scored; returns them (sorted by sample id)
        with their provenance and the prompt source's state after the step's prompts.

        The step watchdog: past ``timeout`` (default ``plan.step_timeout_s``, 0 = none) it
        raises StepTimeout naming the step, the samples still missing and the tier's state."""
        n = self.plan.prompts_per_step * self.plan.samples_per_prompt
        if timeout is None:
            timeout = self.plan.step_timeout_s or None
        return self._channel.take(step, n, timeout)

    def take_times(self) -> RolloutTimes:
        return self._channel.take_times()

    def worker_metrics(self) -> dict:
        """Per-worker samples / restarts / re-dispatched groups and the channel depth (numbers
        only, for metrics.jsonl)."""
        return {k: v for k, v in self._channel.stats().items() if isinstance(v, (int, float))}

    def deaths(self):
        """Worker deaths recovered from so far (read after ``stop`` or for tests)."""
        return list(self._producer.deaths)

    # ------------------------------------------------------------------ weights

    def push_weights(self, named_tensors: list, version: int, *, wait: bool = False) -> None:
        """Publish weights (named HF tensors) as ``version``; samplers load them after their
        current chunk. A load unfinished after ``sync_timeout_s`` fails the run with
        WeightSyncError. ``wait=True`` blocks until every live sampler serves it."""
        self._ask(m.Publish(self.calls.put(named_tensors), version))
        if wait:
            self.wait_for_push()

    def wait_for_push(self) -> None:
        """Block until the last published weights are served (or WeightSyncError)."""
        self._ask(m.WaitPush())

    def mark_served(self, version: int, handles: list | None = None) -> None:
        """Record a version delivered by another path (a collective broadcast) to the samplers
        ``handles`` (None: every live one)."""
        if handles is None:
            self._ask(m.MarkServed(version))
        else:
            self._ask(m.CollectiveServed(version, tuple(handles)))

    def collective_members(self) -> tuple[list, int]:
        """(handles of the samplers a collective group should hold now, how many of them wait
        for its weights): services/weight_publisher.py re-forms the group when these change."""
        return self._ask(m.CollectiveMembers())

    def collective_lost(self, handles: list, why: str) -> None:
        """Samplers found dead, or killed blocked in a broken push: replace them."""
        self._ask(m.CollectiveLost(tuple(handles), why))

    @property
    def served_version(self) -> int:
        return min(self.sampler_versions())

    def sampler_versions(self) -> list[int]:
        return self._ask(m.SamplerVersions())

    @property
    def samplers(self) -> list:
        """Handles of the live samplers now (for NCCL set-up and tools)."""
        return self._ask(m.SamplerHandles())

    def worker_handle(self, name: str):
        """The current handle of pool worker ``name`` (e.g. ``student-sampler-0``), or None."""
        return self._ask(m.WorkerHandle(name))

    def scale(self, *, samplers: int | None = None, scorers: int | None = None) -> None:
        if scorers and self.routes is not None and self.routes.several:
            raise RolloutError(
                "scorers of several teachers are set per teacher ([[teachers]] num_scorers); "
                "only samplers can be scaled"
            )
        self._ask(m.Scale(samplers, scorers))

    def generate(self, prompt_ids: list[list[int]], **kwargs):
        """``StudentEngine.generate`` on a live sampler's current weights (evaluation).

        In-process the call runs on the producer thread (vLLM engines are not thread-safe);
        with actors it goes straight to a live sampler and is retried on another if that one
        dies."""
        if self.in_process:
            return self._ask(m.Generate(prompt_ids, kwargs))
        last: BaseException | None = None
        limit = self.plan.call_timeout_s or None
        for _ in range(3):
            handles = self.samplers
            if not handles:
                break
            try:
                ref = self.calls.call(handles[0], "generate", prompt_ids, **kwargs)
                return self.calls.get(ref, timeout=limit)
            except Exception as exc:
                if not self.calls.is_death(exc):
                    raise
                if isinstance(exc, CallTimeout):
                    # Hung: killed here; the producer sees the death at its next call to it
                    # and replaces it (services/producer.py), as for a crashed sampler.
                    self.calls.kill(handles[0])
                    exc = CallTimeout(f"a sampler's evaluation call {exc} (rollout.call_timeout_s)")
                last = exc
        raise RolloutError(f"evaluation found no live sampler: {last}")

    def score(self, rollouts: list) -> list:
        """The teacher's ``ScoredRollout`` of each ``rollout.records.Rollout`` (evaluation),
        by a live scorer's own scoring path (``rollout.scorer.Scorer.score``): log π_T of each
        response token at ``rollout.teacher_temperature`` (+ top-K when configured)."""
        scored, _seconds = self._on_scorer("score", rollouts)
        return scored

    def teacher_greedy(self, prompt_ids: list[list[int]], *, max_tokens: int) -> list[tuple]:
        """The teacher's greedy completion (token ids) of each prompt, generated by a live
        scorer once per prompt set and kept for the service's life: the teacher does not
        change during a run (a resumed run's service generates the same ones again)."""
        key = (tuple(map(tuple, prompt_ids)), max_tokens)
        if key not in self._teacher_greedy:
            gens = self._on_scorer(
                "generate", prompt_ids, max_tokens=max_tokens, temperature=0.0, n=1
            )
            self._teacher_greedy[key] = [g[0].token_ids for g in gens]
        return self._teacher_greedy[key]

    def _on_scorer(self, method: str, *args, **kwargs):
        """``method`` on a live scorer, with ``generate``'s deadline and retries: started by
        the producer (messages.ScorerCall), waited for here; a scorer that misses the deadline
        is killed (the producer replaces it at its next call to it) and another one asked."""
        last: BaseException | None = None
        limit = self.plan.call_timeout_s or None
        for _ in range(3):
            started = self._ask(m.ScorerCall(method, args, kwargs))
            if started is None:
                break
            handle, ref = started
            try:
                return self.calls.get(ref, timeout=limit)
            except Exception as exc:
                if not self.calls.is_death(exc):
                    raise
                if isinstance(exc, CallTimeout):
                    self.calls.kill(handle)
                    exc = CallTimeout(f"a scorer's evaluation call {exc} (rollout.call_timeout_s)")
                last = exc
        raise RolloutError(f"evaluation found no live scorer: {last}")

    # ------------------------------------------------------------------ shutdown

    def stop(self) -> None:
        self._channel.close()
        self._thread.join(timeout=30)
        if self._control is not None:
            self.calls.kill(self._control)
