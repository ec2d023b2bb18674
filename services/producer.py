"""The one loop that feeds the bounded channel, driven by ``ray.wait`` over outstanding work.

Each turn: read the driver's commands (weights to publish, evaluation, resize), open the next
step when the publisher admits it, hand prompt-group chunks to free samplers and the sampled
groups waiting to an idle scorer (in one call), put scored groups into the channel, then wait
for whichever call finishes first. A worker that dies is replaced by its pool and the work it held is handed out
again; nothing else is shared with the driver thread except the channel.

Dispatch is dynamic at prompt-group granularity: a step's prompts wait in the queue as one run
of consecutive groups, and a free sampler cuts off its share: in proportion to its measured
speed (prompt groups per second over its recent chunks) among the ready samplers, so a slow
sampler takes a small chunk and a fast one a large one, and each engine still batches as much
as it can (on small models a vLLM call costs about the same for 2 prompts as for 32).
``rollout.dispatch_groups`` fixes the chunk size instead. ``static`` dispatch pins chunk i to
sampler i (one chunk each, the old behaviour) and exists for comparison.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import deque
from dataclasses import dataclass, field

from rollout.records import Rollout
from rollout.sampler import SampleRequest, WorkItem
from services.channel import Channel, Provenance, RolloutError
from services.pool import DRAINING, READY, STARTING, SYNCING, Pool, Worker, WorkerFailed
from services.publisher import Publisher, WeightSyncError

POLL_S = 0.02  # longest the loop sleeps before looking at the driver's commands again
CONTROL_POLL_S = 1.0  # how often the resize target is read from the control actor


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
    dispatch_groups: int = 0  # prompt groups per chunk; 0 = auto (see Producer.share)
    dispatch: str = "dynamic"  # or "static"

    def __post_init__(self) -> None:
        if self.dispatch not in ("dynamic", "static"):
            raise ValueError(f"dispatch must be 'dynamic' or 'static', got {self.dispatch!r}")


@dataclass
class Chunk:
    """Consecutive prompt groups of one step: items[i] is the prompt at position first + i."""

    step: int
    first: int
    items: list[WorkItem]
    attempt: int = 1
    slot: int | None = None  # static dispatch: only this sampler slot takes it


@dataclass
class Group:
    """The n samples of one prompt, sampled and waiting to be scored."""

    step: int
    rollouts: list[Rollout]
    sampler: str
    attempt: int


@dataclass(eq=False)
class _Task:
    worker: Worker
    gen: int  # the worker's restart count at submission: results of a replaced worker are void
    t0: float = field(default_factory=time.perf_counter)


@dataclass(eq=False)
class _Ping(_Task):
    pass


@dataclass(eq=False)
class _Load(_Task):
    version: int = 0


@dataclass(eq=False)
class _Sample(_Task):
    chunk: Chunk | None = None
    received: set = field(default_factory=set)


@dataclass(eq=False)
class _Score(_Task):
    groups: list[Group] = field(default_factory=list)


@dataclass(eq=False)
class _Poll:
    """A pending read of the control actor's resize target."""


@dataclass
class _Job:
    source: object
    encode: object
    next_step: int
    last_step: int


@dataclass(frozen=True)
class Death:
    """A worker death the producer recovered from."""

    at: float  # perf_counter seconds
    worker: str
    groups: int  # prompt groups handed out again
    error: str


class Producer:
    def __init__(
        self,
        samplers: Pool,
        scorers: Pool,
        publisher: Publisher,
        channel: Channel,
        plan: RolloutPlan,
        calls,
        control=None,
    ) -> None:
        self.samplers, self.scorers, self.publisher = samplers, scorers, publisher
        self.channel, self.plan, self.calls, self.control = channel, plan, calls, control
        self.tasks: dict = {}
        self.queue: deque[Chunk] = deque()
        self.unscored: deque[Group] = deque()
        self.out: deque[tuple[int, list]] = deque()
        self.job: _Job | None = None
        self.waiters: list = []  # (version, Future) of wait-for-push requests
        self.inflight = 0  # samples of opened steps not yet in the channel
        self.wait_since: float | None = None
        self.deaths: list[Death] = []
        self.control_gen = 0
        self.next_poll = 0.0

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            while not self.channel.closed:
                idle = not self.tasks and not self.out
                for cmd in self.channel.commands(timeout=POLL_S if idle else 0.0):
                    self._command(cmd)
                self._poll_control()
                self._open_steps()
                self._dispatch()
                self._sweep_drained()
                self._deliver()
                self._check_pushes()
                self.channel.set_stats(self.stats())
                self._wait()
        except BaseException as exc:
            for _, fut in self.waiters:
                if not fut.done():
                    fut.set_exception(exc)
            self.channel.fail(exc)
        finally:
            for _, fut in self.waiters:
                if not fut.done():
                    fut.set_exception(RolloutError("rollout service is stopped"))
            for w in self.samplers.workers + self.scorers.workers:
                self.calls.kill(w.handle)

    def _wait(self) -> None:
        ready = self.calls.wait(list(self.tasks), POLL_S)
        for ref in ready:
            task = self.tasks.get(ref)
            if task is None:
                continue
            if isinstance(task, _Sample):
                try:
                    pos, group = self.calls.next(ref)
                except StopIteration:
                    del self.tasks[ref]
                    self._sample_done(task)
                    continue
                except Exception as exc:
                    del self.tasks[ref]
                    self._failed(task, exc)
                    continue
                self._sampled(task, pos, group)
                continue
            del self.tasks[ref]
            try:
                value = self.calls.get(ref)
            except Exception as exc:
                if isinstance(task, _Poll):
                    continue  # the control actor is optional; a failed read is retried
                self._failed(task, exc)
                continue
            self._finished(task, value)

    # ------------------------------------------------------------------ commands

    def _command(self, cmd) -> None:
        kind, args, reply = cmd.kind, cmd.args, cmd.reply
        if kind == "produce":
            source, encode, first, last = args
            self.job = _Job(source, encode, first, last)
            reply.set_result(None)
        elif kind == "publish":
            weights, version = args
            self.publisher.publish(weights, version)
            for w in self.samplers.workers:
                if w.state in (READY, DRAINING, SYNCING):
                    self._load(w)
            reply.set_result(None)
        elif kind == "mark_served":
            self.publisher.mark_external(args[0], self.samplers.live())
            reply.set_result(None)
        elif kind == "wait_push":
            self.waiters.append((self.publisher.version, reply))
        elif kind == "versions":
            reply.set_result([w.version for w in self.samplers.live()])
        elif kind == "handles":
            reply.set_result([w.handle for w in self.samplers.live()])
        elif kind == "handle":
            pool_workers = self.samplers.workers + self.scorers.workers
            reply.set_result(next((w.handle for w in pool_workers if w.name == args[0]), None))
        elif kind == "generate":  # in-process evaluation: engines are not thread-safe
            prompt_ids, kwargs = args
            w = min(self.samplers.live(), key=lambda w: w.slot)
            try:
                reply.set_result(w.handle.generate(prompt_ids, **kwargs))
            except Exception as exc:
                reply.set_exception(exc)
        elif kind == "scale":
            self._resize(*args)
            reply.set_result(None)
        else:
            reply.set_exception(ValueError(f"unknown rollout command {kind!r}"))

    def _resize(self, samplers: int | None, scorers: int | None) -> None:
        for pool, n in ((self.samplers, samplers), (self.scorers, scorers)):
            if n:
                for w in pool.resize(n):
                    self._ping(pool, w)

    def _poll_control(self) -> None:
        if self.control is None or time.perf_counter() < self.next_poll:
            return
        if any(isinstance(t, _Poll) for t in self.tasks.values()):
            return
        self.next_poll = time.perf_counter() + CONTROL_POLL_S
        self.tasks[self.calls.call(self.control, "target")] = _Poll()

    # ------------------------------------------------------------------ admission

    def share(self, w: Worker) -> int:
        """Prompt groups ``w`` takes at once (at least 1). Auto: its part of a step in
        proportion to its speed among the ready samplers (``Worker.rate``; a sampler not yet
        measured counts as the mean of the measured ones, all as equal when none is), so one
        sampler takes the whole step as one engine batch and two equal ones half each."""
        if self.plan.dispatch_groups:
            return self.plan.dispatch_groups
        ready = self.samplers.ready() or [w]
        known = [v.rate for v in ready if v.rate > 0]
        default = sum(known) / len(known) if known else 1.0
        speed = {id(v): v.rate if v.rate > 0 else default for v in ready}
        mine = speed.get(id(w), default)
        part = mine / sum(speed.values()) * self.plan.prompts_per_step
        # The fastest rounds up and the others down, so a slow sampler's last group never
        # outlasts the fast one's whole share (the step ends with its slowest chunk).
        return max(1, math.ceil(part - 1e-9) if mine >= max(speed.values()) else math.floor(part))

    def _open_steps(self) -> None:
        job = self.job
        while job is not None and job.next_step <= job.last_step and not self.queue:
            step = job.next_step
            live = self.samplers.live()
            admitted = min((max(w.version, w.loading) for w in live), default=-1)
            batch = self.plan.prompts_per_step * self.plan.samples_per_prompt
            busy = self.inflight + self.channel.depth()
            if (
                not live
                or not self.publisher.admits(step, admitted)
                or (busy and busy + batch > self.channel.capacity)
            ):
                if self.wait_since is None:
                    self.wait_since = time.perf_counter()
                return
            if self.wait_since is not None:
                self.channel.add_times(producer_wait=time.perf_counter() - self.wait_since)
                self.wait_since = None
            problems = job.source.next_batch(self.plan.prompts_per_step)
            # The state after drawing batch k is where a run resumed after step k starts.
            self.channel.set_source_state(step + 1, job.source.state())
            items = [WorkItem(p.id, p.answer, tuple(job.encode(p.prompt))) for p in problems]
            self.queue.extend(self._chunks(step, items, live))
            self.inflight += len(items) * self.plan.samples_per_prompt
            job.next_step += 1

    def _chunks(self, step: int, items: list[WorkItem], live: list[Worker]) -> list[Chunk]:
        if self.plan.dispatch == "static":
            slots = sorted(w.slot for w in live)
            size = math.ceil(len(items) / len(slots))
            return [
                Chunk(step, i * size, items[i * size : (i + 1) * size], slot=slot)
                for i, slot in enumerate(slots)
                if items[i * size : (i + 1) * size]
            ]
        return [Chunk(step, 0, items)]  # cut by each taker's share in _dispatch

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self) -> None:
        for w in sorted(self.samplers.ready(), key=lambda w: w.slot):
            if w.outstanding > 0:
                continue
            chunk = next(
                (
                    c
                    for c in self.queue
                    if (c.slot is None or c.slot == w.slot) and self.publisher.may_take(w, c.step)
                ),
                None,
            )
            if chunk is None:
                continue
            if chunk.slot is None and len(chunk.items) > (take := self.share(w)):
                rest = Chunk(chunk.step, chunk.first + take, chunk.items[take:], chunk.attempt)
                self.queue[self.queue.index(chunk)] = rest
                chunk = Chunk(chunk.step, chunk.first, chunk.items[:take], chunk.attempt)
            else:
                self.queue.remove(chunk)
            p = self.plan
            req = SampleRequest(
                n=p.samples_per_prompt,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                # Fixed by (run seed, step, position): a re-dispatched chunk draws the same.
                seed=p.seed * 1_000_003 + chunk.step * 1009 + chunk.first,
            )
            ref = self.calls.call(w.handle, "sample_stream", chunk.items, req, streaming=True)
            self.tasks[ref] = _Sample(w, w.restarts, chunk=chunk)
            w.outstanding = len(chunk.items)
        self._dispatch_scores()

    def _dispatch_scores(self) -> None:
        """An idle scorer takes the sampled groups waiting (up to its part of a step) in one
        teacher call; while every scorer is busy, groups wait and are scored together. One
        call per group cost a vLLM scheduling round per 4 sequences."""
        while self.unscored:
            idle = [w for w in self.scorers.ready() if w.outstanding <= 0]
            if not idle:
                return
            w = min(idle, key=lambda w: w.slot)
            cap = max(1, math.ceil(self.plan.prompts_per_step / len(self.scorers.ready())))
            groups = [self.unscored.popleft() for _ in range(min(cap, len(self.unscored)))]
            rollouts = [r for g in groups for r in g.rollouts]
            ref = self.calls.call(w.handle, "score", rollouts)
            self.tasks[ref] = _Score(w, w.restarts, groups=groups)
            w.outstanding += len(groups)

    def _deliver(self) -> None:
        while self.out and self.channel.room() >= len(self.out[0][1]):
            step, items = self.out.popleft()
            self.channel.put(step, items)
            self.inflight -= len(items)

    # ------------------------------------------------------------------ results

    def _sampled(self, task: _Sample, pos: int, rollouts: list[Rollout]) -> None:
        if task.gen != task.worker.restarts or pos in task.received:
            return
        task.received.add(pos)
        task.worker.outstanding -= 1
        self.unscored.append(Group(task.chunk.step, rollouts, task.worker.name, task.chunk.attempt))
        self._dispatch_scores()

    def _sample_done(self, task: _Sample) -> None:
        w, chunk = task.worker, task.chunk
        if task.gen != w.restarts:
            return
        if len(task.received) != len(chunk.items):
            raise RuntimeError(
                f"{w.name} ended a stream after {len(task.received)}/{len(chunk.items)} groups"
            )
        # outstanding already fell by one per group; the sampler may hold its next chunk now
        seconds = time.perf_counter() - task.t0
        self.channel.add_times(sample=seconds)
        w.observe_rate(len(chunk.items) / max(seconds, 1e-6))
        self._retire_if_drained(self.samplers, w)

    def _finished(self, task, value) -> None:
        if isinstance(task, _Poll):
            gen, samplers, scorers = value
            if gen != self.control_gen:
                self.control_gen = gen
                self._resize(samplers, scorers)
            return
        w = task.worker
        if task.gen != w.restarts:
            return
        if isinstance(task, _Score):
            scored, seconds = value
            at = 0
            for group in task.groups:  # the call's rollouts are its groups' in order
                part, at = scored[at : at + len(group.rollouts)], at + len(group.rollouts)
                prov = Provenance(group.sampler, w.name, group.attempt)
                self.out.append((group.step, [(s, prov) for s in part]))
                sampler = self._worker(self.samplers, group.sampler)
                if sampler is not None:
                    sampler.samples += len(part)
            w.outstanding -= len(task.groups)
            w.samples += len(scored)
            self.channel.add_times(score=seconds, samples=len(scored))
            self._retire_if_drained(self.scorers, w)
        elif isinstance(task, _Ping):
            if w.state != STARTING:
                return
            if self.scorers.workers and w in self.scorers.workers:
                w.state = READY
            else:
                w.version = int(value)
                w.state = SYNCING
                self._load(w) or self._synced(w)
        elif isinstance(task, _Load):
            version, _seconds = value
            self.publisher.loaded(w, version)
            if w.state == SYNCING and not self._load(w):
                self._synced(w)

    def _synced(self, w: Worker) -> None:
        if w.state == SYNCING:
            w.state = READY

    def _check_pushes(self) -> None:
        for task in self.tasks.values():
            if isinstance(task, _Load) and self.publisher.overdue(task.t0):
                raise WeightSyncError(
                    f"weight push of version {task.version} did not complete on "
                    f"{task.worker.name} within {self.publisher.sync_timeout_s:.0f} s "
                    f"(rollout.sync_timeout_s)"
                )
        live = self.samplers.live()
        keep = []
        for version, fut in self.waiters:
            if all(w.version >= version for w in live) and not any(
                w.state in (STARTING, SYNCING) for w in self.samplers.workers
            ):
                fut.set_result(None)
            else:
                keep.append((version, fut))
        self.waiters = keep

    # ------------------------------------------------------------------ faults

    def _failed(self, task: _Task, exc: BaseException) -> None:
        w = task.worker
        if task.gen != w.restarts:
            return  # a call to a worker that has already been replaced
        if not self.calls.is_death(exc):
            raise exc
        pool = self.samplers if w in self.samplers.workers else self.scorers
        groups = self._reclaim(w, task)
        self.deaths.append(Death(time.perf_counter(), w.name, groups, str(exc)[-300:]))
        if w.state == DRAINING:
            pool.retire(w)
            return
        pool.restart(w, exc)  # raises WorkerFailed once the budget is spent
        self._ping(pool, w)

    def _reclaim(self, w: Worker, failed: _Task) -> int:
        """Hand back every group ``w`` holds (``failed``, the call that told us, included:
        it has already left ``tasks``); returns how many."""
        held = [failed]
        for ref, task in list(self.tasks.items()):
            if getattr(task, "worker", None) is w:
                del self.tasks[ref]
                held.append(task)
        groups = 0
        for task in held:
            if isinstance(task, _Sample):
                chunk = task.chunk
                todo = [i for i in range(len(chunk.items)) if i not in task.received]
                for run in _runs(todo):
                    self.queue.appendleft(
                        Chunk(
                            chunk.step,
                            chunk.first + run[0],
                            [chunk.items[i] for i in run],
                            attempt=chunk.attempt + 1,
                            slot=chunk.slot,
                        )
                    )
                groups += len(todo)
            elif isinstance(task, _Score):
                for g in reversed(task.groups):
                    self.unscored.appendleft(Group(g.step, g.rollouts, g.sampler, g.attempt + 1))
                groups += len(task.groups)
        w.redispatched += groups
        w.outstanding = 0
        return groups

    def _ping(self, pool: Pool, w: Worker) -> None:
        self.tasks[pool.ping(w)] = _Ping(w, w.restarts)

    def _load(self, w: Worker) -> bool:
        ref = self.publisher.load(w)
        if ref is None:
            return False
        self.tasks[ref] = _Load(w, w.restarts, version=self.publisher.version)
        return True

    def _sweep_drained(self) -> None:
        for pool in (self.samplers, self.scorers):
            for w in [w for w in pool.workers if w.state == DRAINING]:
                held = any(
                    isinstance(t, (_Sample, _Score)) and t.worker is w for t in self.tasks.values()
                )
                if not held:
                    self._retire_if_drained(pool, w)

    def _retire_if_drained(self, pool: Pool, w: Worker) -> None:
        if w.state == DRAINING and w.outstanding <= 0:
            for ref, task in list(self.tasks.items()):
                if getattr(task, "worker", None) is w:
                    del self.tasks[ref]
            pool.retire(w)

    @staticmethod
    def _worker(pool: Pool, name: str) -> Worker | None:
        return next((w for w in pool.workers + pool.removed if w.name == name), None)

    # ------------------------------------------------------------------ metrics

    def stats(self) -> dict:
        row = {
            "rollout/channel_depth": self.channel.depth(),
            "rollout/num_samplers": len(self.samplers.live()),
            "rollout/num_scorers": len(self.scorers.ready()),
            "rollout/restarts": sum(
                w.restarts for p in (self.samplers, self.scorers) for w in p.workers + p.removed
            ),
            "rollout/redispatched_groups": sum(
                w.redispatched for p in (self.samplers, self.scorers) for w in p.workers + p.removed
            ),
            "rollout/deaths": len(self.deaths),
            "rollout/queued_groups": sum(len(c.items) for c in self.queue),
            "rollout/unscored_groups": len(self.unscored),
            "rollout/calls_in_flight": len(self.tasks),
        }
        for pool in (self.samplers, self.scorers):
            for w in pool.workers:
                row[f"worker/{w.name}/state"] = w.state
        row.update(self.samplers.counters())
        row.update(self.scorers.counters())
        return row


def _runs(positions: list[int]) -> list[list[int]]:
    """Split sorted positions into runs of consecutive ones ([0, 1, 3] → [[0, 1], [3]])."""
    runs: list[list[int]] = []
    for p in positions:
        if runs and runs[-1][-1] == p - 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def response_crc(rollout: Rollout) -> int:
    """A checksum of the sampled tokens, for the ledger (resume exactness is checked on it)."""
    return zlib.crc32(",".join(map(str, rollout.response_ids)).encode())


__all__ = ["Producer", "RolloutPlan", "WorkerFailed", "response_crc"]
