"""The one loop that feeds the bounded channel, driven by ``ray.wait`` over outstanding calls.

Each turn (``run``) reads as its sync points: the driver's messages, the resize target, open
admitted steps, dispatch, retire drained workers, deliver to the channel, answer push waiters,
wait for the first call to finish. Who gets what is decided by ``services.scheduler`` (pure);
worker states change only in ``services.pool``; versions in ``services.versions``. A dead
worker is replaced by its pool and its work handed out again (``services.recovery``); only the
channel is shared.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollout.records import Rollout
from rollout.sampler import SampleRequest, WorkItem
from services import messages as m
from services.calls import Deadlines, Death, Load, Ping, Poll, Sample, Score
from services.channel import Channel, Command, Provenance, RolloutError
from services.pool import DRAINING, READY, STARTING, SYNCING, Pool, Worker
from services.push_waits import PushWaits
from services.recovery import Recovery
from services.scheduler import Group, Scheduler, chunk_seed, may_open
from services.teachers import Routes
from services.versions import Versions

if TYPE_CHECKING:
    from services.rollout_service import RolloutPlan

POLL_S = 0.02  # longest the loop sleeps before looking at the driver's messages again
CONTROL_POLL_S = 1.0  # how often the resize target is read from the control actor


@dataclass
class _Job:
    source: object
    encode: object
    next_step: int
    last_step: int


_ANSWERED = (
    m.CollectiveMembers,
    m.CollectiveServed,
    m.CollectiveLost,
    m.Produce,
    m.Publish,
    m.MarkServed,
    m.SamplerVersions,
    m.SamplerHandles,
    m.WorkerHandle,
    m.Scale,
)


class Producer:
    def __init__(
        self,
        samplers: Pool,
        scorers: Pool,
        versions: Versions,
        channel: Channel,
        plan: RolloutPlan,
        calls,
        control=None,
        clock=time.perf_counter,
        routes: Routes | None = None,
    ) -> None:
        """routes: which teacher scores each prompt, whose each scorer slot is (several
        teachers: services/teachers.py); None = one teacher, every scorer its."""
        self.samplers, self.scorers, self.versions = samplers, scorers, versions
        self.routes = routes
        self.channel, self.plan, self.calls, self.control = channel, plan, calls, control
        self.scheduler = Scheduler(plan.prompts_per_step, plan.dispatch_groups)
        self.tasks: dict = {}
        self.out: deque[tuple[int, list]] = deque()
        self.job: _Job | None = None
        self.waits = PushWaits(plan.start_timeout_s)  # the driver's WaitPush messages
        self.inflight = 0  # samples of opened steps not yet in the channel
        self.wait_since: float | None = None
        self.control_gen = 0
        self.next_poll = 0.0
        self.clock = clock  # the clock of the call records (services.calls)
        limits = Deadlines(
            call_s=plan.call_timeout_s,
            start_s=plan.start_timeout_s,
            load_s=plan.sync_timeout_s,
        )
        self.recovery = Recovery(
            samplers, scorers, self.scheduler, calls, self.tasks, limits, self._ping, clock
        )

    @property
    def deaths(self) -> list[Death]:
        """The worker deaths recovered from so far (services/recovery.py)."""
        return self.recovery.deaths

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        try:
            while not self.channel.closed:
                idle = not self.tasks and not self.out
                for cmd in self.channel.commands(timeout=POLL_S if idle else 0.0):
                    self.handle(cmd)
                self._poll_control()
                self._open_steps()
                self._dispatch()
                self.recovery.sweep_drained()
                self._deliver()
                self.recovery.check_deadlines()
                self.waits.check(self.samplers, self.versions, self.clock())
                self.channel.set_stats(self.stats())
                self._wait()
        except BaseException as exc:
            self.waits.fail(exc)
            self.channel.fail(exc)
        finally:
            self.waits.fail(RolloutError("rollout service is stopped"))
            for w in self.samplers.workers + self.scorers.workers:
                self.calls.kill(w.handle)

    def _wait(self) -> None:
        for ref in self.calls.wait(list(self.tasks), POLL_S):
            task = self.tasks.get(ref)
            if task is None:
                continue
            stream = isinstance(task, Sample)  # a streaming call: one group per item
            try:
                value = self.calls.next(ref) if stream else self.calls.get(ref)
            except StopIteration:
                del self.tasks[ref]
                self._sample_done(task)
            except Exception as exc:
                del self.tasks[ref]
                if not isinstance(task, Poll):  # the control actor is optional: read again
                    self.recovery.failed(task, exc)
            else:
                if stream:
                    self._sampled(task, *value)
                else:
                    del self.tasks[ref]
                    self._finished(task, value)

    # ------------------------------------------------------------------ messages

    def handle(self, cmd: Command) -> None:
        """Answer one message from the driver thread (services/messages.py). A failure of the
        rollout tier (a weight push it cannot make) fails the loop; a failed evaluation call
        and an unknown message fail only their reply."""
        msg, reply = cmd.message, cmd.reply
        if isinstance(msg, m.WaitPush):
            self.waits.add(self.versions.version, reply, self.clock())
        elif isinstance(msg, m.Generate):
            try:
                w = min(self.samplers.live(), key=lambda w: w.slot)
                reply.set_result(w.handle.generate(msg.prompt_ids, **msg.kwargs))
            except Exception as exc:
                reply.set_exception(exc)
        elif isinstance(msg, m.ScorerCall):  # started here, waited for by the driver
            try:
                w = min(self.scorers.ready(), key=lambda w: w.slot, default=None)
                if w is None:
                    reply.set_result(None)
                else:
                    call = self.calls.call(w.handle, msg.method, *msg.args, **msg.kwargs)
                    reply.set_result((w.handle, call))
            except Exception as exc:
                reply.set_exception(exc)
        elif type(msg) not in _ANSWERED:
            reply.set_exception(TypeError(f"the producer has no handler for {msg!r}"))
        else:
            try:
                answer = self._answer(msg)
            except BaseException as exc:  # the driver's wait ends too; the loop then fails
                reply.set_exception(exc)
                raise
            reply.set_result(answer)

    def _answer(self, msg: m.Message):
        if isinstance(msg, m.Produce):
            self.job = _Job(msg.source, msg.encode, msg.first_step, msg.last_step)
        elif isinstance(msg, m.Publish):
            self.versions.publish(msg.weights, msg.version)
            for w in self.samplers.workers:
                if w.state in (READY, DRAINING, SYNCING):
                    self._load(w)
        elif isinstance(msg, m.MarkServed):
            self.versions.mark_external(msg.version, self.samplers.live())
        elif isinstance(msg, m.SamplerVersions):
            return [w.version for w in self.samplers.live()]
        elif isinstance(msg, m.SamplerHandles):
            # Ready first: a draining sampler may not get a collective push (evaluation).
            return [w.handle for w in sorted(self.samplers.live(), key=lambda w: w.state != READY)]
        elif isinstance(msg, m.CollectiveMembers):
            members = sorted(
                (w for w in self.samplers.workers if w.state in (READY, SYNCING)),
                key=lambda w: w.slot,
            )
            return [w.handle for w in members], sum(w.state == SYNCING for w in members)
        elif isinstance(msg, m.CollectiveServed):
            got = [w for w in self.samplers.workers if any(w.handle == h for h in msg.handles)]
            self.versions.mark_external(msg.version, got)
            for w in got:
                self.samplers.synced(w)
        elif isinstance(msg, m.CollectiveLost):
            for w in [w for w in self.samplers.workers if any(w.handle == h for h in msg.handles)]:
                self.recovery.lost(w, RuntimeError(msg.why))
        elif isinstance(msg, m.WorkerHandle):
            workers = self.samplers.workers + self.scorers.workers
            return next((w.handle for w in workers if w.name == msg.name), None)
        elif isinstance(msg, m.Scale):
            self._resize(msg.samplers, msg.scorers)
        return None

    def _resize(self, samplers: int | None, scorers: int | None) -> None:
        if self.routes is not None and self.routes.several:
            scorers = None  # each teacher's scorers are its [[teachers]] entry's (no resize)
        for pool, n in ((self.samplers, samplers), (self.scorers, scorers)):
            if n:
                for w in pool.resize(n):
                    self._ping(pool, w)

    def _poll_control(self) -> None:
        if self.control is None or time.perf_counter() < self.next_poll:
            return
        if any(isinstance(t, Poll) for t in self.tasks.values()):
            return
        self.next_poll = time.perf_counter() + CONTROL_POLL_S
        self.tasks[self.calls.call(self.control, "target")] = Poll(t0=self.clock())

    # ------------------------------------------------------------------ admission, dispatch

    def _open_steps(self) -> None:
        job, p = self.job, self.plan
        while job is not None and job.next_step <= job.last_step and not self.scheduler.queue:
            step, live = job.next_step, self.samplers.live()
            served = max((max(w.version, w.loading) for w in live), default=-1)
            if not may_open(
                live=len(live),
                admitted=self.versions.admits(step, served),
                in_flight=self.inflight + self.channel.depth(),
                step_samples=p.prompts_per_step * p.samples_per_prompt,
                capacity=self.channel.capacity,
            ):
                if self.wait_since is None:
                    self.wait_since = time.perf_counter()
                return
            if self.wait_since is not None:
                self.channel.add_times(producer_wait=time.perf_counter() - self.wait_since)
                self.wait_since = None
            problems = job.source.next_batch(p.prompts_per_step)
            if self.routes is not None:
                self.routes.note(problems)  # who scores each (several teachers)
            # The state after drawing batch k is where a run resumed after step k starts.
            self.channel.set_source_state(step, job.source.state())
            items = [self._work_item(job, q) for q in problems]
            self.scheduler.open_step(step, items)
            self.inflight += len(items) * p.samples_per_prompt
            job.next_step += 1

    def _work_item(self, job: _Job, q) -> WorkItem:
        """A prompt to sample; in an episode its environment's first prompt, with the problem
        the sampler's environment starts from (rollout/episodes.py)."""
        episodes = self.plan.episodes
        if episodes is None:
            return WorkItem(q.id, q.answer, tuple(job.encode(q.prompt)))
        return WorkItem(q.id, q.answer, tuple(job.encode(episodes.prompt(q))), q)

    def _dispatch(self) -> None:
        ready = sorted(self.samplers.ready(), key=lambda w: w.slot)
        rates = [w.rate for w in ready]
        for w in ready:
            if w.outstanding > 0:
                continue
            chunk = self.scheduler.take_chunk(
                w.rate, rates, lambda step, w=w: self.versions.may_take(w, step)
            )
            if chunk is None:
                continue
            p = self.plan
            req = SampleRequest(
                p.samples_per_prompt,
                p.max_tokens,
                p.temperature,
                chunk_seed(p.seed, chunk),
                episodes=p.episodes,
            )
            ref = self.calls.call(w.handle, "sample_stream", list(chunk.items), req, streaming=True)
            now = self.clock()
            self.tasks[ref] = Sample(w, w.restarts, t0=now, seen=now, chunk=chunk)
            w.outstanding = len(chunk.items)
        self._dispatch_scores()

    def _dispatch_scores(self) -> None:
        if self.routes is not None and self.routes.several:
            return self._dispatch_teachers(self.routes)
        while self.scheduler.unscored:
            idle = [w for w in self.scorers.ready() if w.outstanding <= 0]
            if not idle:
                return
            w = min(idle, key=lambda w: w.slot)
            groups = self.scheduler.take_groups(len(self.scorers.ready()))
            self._score(w, groups)

    def _dispatch_teachers(self, routes: Routes) -> None:
        """Several teachers: each idle scorer takes the waiting groups of its own teacher (up
        to its part of a step among that teacher's ready scorers)."""
        for w in sorted(self.scorers.ready(), key=lambda w: w.slot):
            if not self.scheduler.unscored:
                return
            if w.outstanding > 0:
                continue
            mine = routes.slot_teacher(w.slot)
            peers = sum(routes.slot_teacher(v.slot) == mine for v in self.scorers.ready())
            groups = self.scheduler.take_groups(peers, routes.accepts(w.slot))
            if groups:
                self._score(w, groups)

    def _score(self, w: Worker, groups: list[Group]) -> None:
        rollouts = [r for g in groups for r in g.rollouts]
        self.tasks[self.calls.call(w.handle, "score", rollouts)] = Score(
            w, w.restarts, t0=self.clock(), groups=groups
        )
        w.outstanding += len(groups)

    def _deliver(self) -> None:
        while self.out and self.channel.room() >= len(self.out[0][1]):
            step, items = self.out.popleft()
            self.channel.put(step, items)
            self.inflight -= len(items)

    # ------------------------------------------------------------------ results

    def _sampled(self, task: Sample, pos: int, rollouts: list[Rollout]) -> None:
        if task.gen != task.worker.restarts or pos in task.received:
            return
        task.seen = self.clock()
        task.received.add(pos)
        task.worker.outstanding -= 1
        group = Group(task.chunk.step, tuple(rollouts), task.worker.name, task.chunk.attempt)
        self.scheduler.sampled(group)
        self._dispatch_scores()

    def _sample_done(self, task: Sample) -> None:
        w, chunk = task.worker, task.chunk
        if task.gen != w.restarts:
            return
        if len(task.received) != len(chunk.items):
            raise RuntimeError(
                f"{w.name} ended a stream after {len(task.received)}/{len(chunk.items)} groups"
            )
        seconds = self.clock() - task.t0
        self.channel.add_times(sample=seconds)
        w.observe_rate(len(chunk.items) / max(seconds, 1e-6))
        self.recovery.retire_if_drained(self.samplers, w)

    def _finished(self, task, value) -> None:
        if isinstance(task, Poll):
            gen, samplers, scorers = value
            if gen != self.control_gen:
                self.control_gen = gen
                self._resize(samplers, scorers)
            return
        w = task.worker
        if task.gen != w.restarts:
            return
        if isinstance(task, Score):
            scored, seconds = value
            at = 0
            for group in task.groups:  # the call's rollouts are its groups' in order
                part, at = scored[at : at + len(group.rollouts)], at + len(group.rollouts)
                teacher = self.routes.slot_teacher(w.slot) if self.routes else ""
                prov = Provenance(group.sampler, w.name, group.attempt, teacher)
                self.out.append((group.step, [(s, prov) for s in part]))
                sampler = self.samplers.find(group.sampler)
                if sampler is not None:
                    sampler.samples += len(part)
            w.outstanding -= len(task.groups)
            w.samples += len(scored)
            self.channel.add_times(score=seconds, samples=len(scored))
            self.recovery.retire_if_drained(self.scorers, w)
        elif isinstance(task, Ping):
            if w.state != STARTING:
                return
            pool = self.samplers if self.samplers.holds(w) else self.scorers
            pool.started(w, value)
            if w.state == SYNCING and not self._load(w):
                pool.synced(w)
        elif isinstance(task, Load):
            version, _seconds = value
            self.versions.loaded(w, version)
            if w.state == SYNCING and not self._load(w):
                self.samplers.synced(w)

    # ------------------------------------------------------------------ workers

    def _ping(self, pool: Pool, w: Worker) -> None:
        self.tasks[pool.ping(w)] = Ping(w, w.restarts, t0=self.clock())

    def _load(self, w: Worker) -> bool:
        if self.versions.awaits_push(w):
            return True  # stays syncing until the next collective push (messages.CollectiveServed)
        ref = self.versions.load(w)
        if ref is None:
            return False
        self.tasks[ref] = Load(w, w.restarts, t0=self.clock(), version=self.versions.version)
        return True

    def stats(self) -> dict:
        everyone = [w for p in (self.samplers, self.scorers) for w in p.workers + p.removed]
        row = {
            "rollout/channel_depth": self.channel.depth(),
            "rollout/num_samplers": len(self.samplers.live()),
            "rollout/num_scorers": len(self.scorers.ready()),
            "rollout/restarts": sum(w.restarts for w in everyone),
            "rollout/redispatched_groups": sum(w.redispatched for w in everyone),
            "rollout/deaths": len(self.deaths),
            "rollout/queued_groups": self.scheduler.queued_groups,
            "rollout/unscored_groups": len(self.scheduler.unscored),
            "rollout/calls_in_flight": len(self.tasks),
        }
        row.update(self.samplers.counters())
        row.update(self.scorers.counters())
        return row
