"""Typed records at the rollout stage boundaries.

``Rollout`` is what a student sampler makes; ``ScoredRollout`` adds the teacher's log-probs.
Per-token fields are checked for equal length when a record is built, so a misaligned
record fails where it is made rather than as a silent shift inside the learner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

FINISH_REASONS = ("stop", "length", "abort")


class RecordError(UserError, ValueError):
    """A rollout record is malformed (lengths, values or versions)."""


def _check_logps(name: str, logps: tuple[float, ...], sample_id: str) -> None:
    for i, lp in enumerate(logps):
        # log-probs are <= 0; a tiny positive value is engine round-off, not an error.
        if not (math.isfinite(lp) and lp <= 1e-4):
            raise RecordError(f"{sample_id}: {name}[{i}] = {lp!r} is not a finite log-prob <= 0")


@dataclass(frozen=True, slots=True)
class Episode:
    """How an episode's trajectory (``Rollout.response_ids``) splits into turns (docs/math.md
    §10): the student's turns, and between them the environment's answers.

    turns:       [(start, end)] response positions of each student turn, in order, disjoint,
                 non-empty; every other response token is the environment's.
    tool_calls:  calls the environment answered; tool_errors: those answered with an error.
    cut:         the last student turn opened a tool call and ran out of tokens before
                 closing it (the episode's budget or max_tokens).
    """

    turns: tuple[tuple[int, int], ...]
    tool_calls: int = 0
    tool_errors: int = 0
    cut: bool = False

    @property
    def student_tokens(self) -> int:
        return sum(end - start for start, end in self.turns)


@dataclass(frozen=True, slots=True)
class Rollout:
    """One sampled response, or one episode's trajectory.

    sample_id:      unique id "<problem_id>/<k>" (k-th sample of that problem).
    prompt_ids:     [P] prompt token ids (BOS included).
    response_ids:   [R] sampled token ids (EOS included when the sampler stopped on it); in
                    an episode, the whole trajectory after the prompt: the student's turns and
                    the environment's answers between them.
    logp_sampler:   [R] log π_sampler(y_t | s_t) recorded at sampling time; 0.0 at the
                    environment's tokens.
    policy_version: version of the weights that sampled it.
    episode:        None for a single-turn response (every response token is the student's);
                    else the turns (`Episode`), from which `student_mask` follows.
    """

    sample_id: str
    problem_id: str
    answer: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    logp_sampler: tuple[float, ...]
    policy_version: int
    finish_reason: str
    episode: Episode | None = None

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise RecordError(f"{self.sample_id}: empty prompt_ids")
        if len(self.response_ids) != len(self.logp_sampler):
            raise RecordError(
                f"{self.sample_id}: {len(self.response_ids)} response ids but "
                f"{len(self.logp_sampler)} sampler log-probs"
            )
        if self.policy_version < 0:
            raise RecordError(f"{self.sample_id}: negative policy_version {self.policy_version}")
        if self.finish_reason not in FINISH_REASONS:
            raise RecordError(
                f"{self.sample_id}: finish_reason {self.finish_reason!r} not in {FINISH_REASONS}"
            )
        _check_logps("logp_sampler", self.logp_sampler, self.sample_id)
        if self.episode is not None:
            self._check_episode()

    def _check_episode(self) -> None:
        ep, sid, R = self.episode, self.sample_id, len(self.response_ids)
        end = 0
        for start, stop in ep.turns:
            if not end <= start < stop <= R:
                raise RecordError(
                    f"{sid}: episode turns {ep.turns} are not disjoint, ordered, non-empty "
                    f"spans of the {R} response positions"
                )
            end = stop
        if min(ep.tool_calls, ep.tool_errors) < 0 or ep.tool_errors > ep.tool_calls:
            raise RecordError(
                f"{sid}: {ep.tool_errors} tool errors of {ep.tool_calls} calls is not a count"
            )
        for t, (m, lp) in enumerate(zip(self.student_mask, self.logp_sampler, strict=True)):
            # The sampler did not draw the environment's tokens: no log-prob to record.
            if not m and lp != 0.0:
                raise RecordError(f"{sid}: logp_sampler[{t}] = {lp!r} at an environment token")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def student_mask(self) -> tuple[int, ...] | None:
        """[R] 1 at the student's tokens, 0 at the environment's; None: a single-turn
        response, every token the student's."""
        if self.episode is None:
            return None
        mask = [0] * len(self.response_ids)
        for start, end in self.episode.turns:
            mask[start:end] = [1] * (end - start)
        return tuple(mask)


@dataclass(frozen=True, slots=True)
class ScoredRollout:
    """A rollout plus the teacher's log-prob of each response token: logp_teacher [R].

    teacher_topk_ids / teacher_topk_logp: optional [R][K], the teacher's top-K token ids and
    log-probs at each response position, in rank order (dense OPD+, learner/dense.py). Both
    or neither; every position has the same K.
    teacher_hidden: optional [R, H] tensor (distill.teacher_topk = "full"): row t is the
    teacher's final-norm hidden state at the position that predicts response token t
    (``rollout.engine.TeacherHiddenEngine.hidden_states``); the learner applies the teacher's
    output layer to it. Not together with top-K.
    """

    rollout: Rollout
    logp_teacher: tuple[float, ...]
    teacher_topk_ids: tuple[tuple[int, ...], ...] | None = None
    teacher_topk_logp: tuple[tuple[float, ...], ...] | None = None
    teacher_hidden: Tensor | None = None

    def __post_init__(self) -> None:
        r = self.rollout
        if len(self.logp_teacher) != len(r.response_ids):
            raise RecordError(
                f"{r.sample_id}: {len(r.response_ids)} response ids but "
                f"{len(self.logp_teacher)} teacher log-probs"
            )
        _check_logps("logp_teacher", self.logp_teacher, r.sample_id)
        self._check_topk()
        self._check_hidden()

    def _check_hidden(self) -> None:
        h, sid = self.teacher_hidden, self.rollout.sample_id
        if h is None:
            return
        from torch import Tensor  # only records with hidden states need torch

        if self.teacher_topk_ids is not None:
            raise RecordError(f"{sid}: teacher_hidden and the teacher's top-K do not come together")
        R = len(self.rollout.response_ids)
        if not isinstance(h, Tensor) or h.dim() != 2 or h.shape[0] != R or h.shape[1] < 1:
            got = tuple(h.shape) if isinstance(h, Tensor) else type(h).__name__
            raise RecordError(f"{sid}: teacher_hidden is {got}, expected [{R}, H] (R response ids)")
        if h.is_floating_point() and not bool(h.isfinite().all()):
            raise RecordError(f"{sid}: teacher_hidden holds a non-finite value")
        if not h.is_floating_point():
            raise RecordError(f"{sid}: teacher_hidden has dtype {h.dtype}, expected floating")

    def _check_topk(self) -> None:
        ids, logps, sid = self.teacher_topk_ids, self.teacher_topk_logp, self.rollout.sample_id
        if ids is None and logps is None:
            return
        if ids is None or logps is None:
            raise RecordError(f"{sid}: teacher_topk_ids and teacher_topk_logp come together")
        R = len(self.rollout.response_ids)
        if len(ids) != R or len(logps) != R:
            raise RecordError(
                f"{sid}: {R} response ids but top-K for {len(ids)} / {len(logps)} positions"
            )
        k = len(ids[0]) if R else 0
        for t, (row_ids, row_logps) in enumerate(zip(ids, logps, strict=True)):
            if not (len(row_ids) == len(row_logps) == k) or k < 1:
                raise RecordError(
                    f"{sid}: position {t} has {len(row_ids)} top-K ids and {len(row_logps)} "
                    f"log-probs, expected {k} >= 1 of each"
                )
            if min(row_ids) < 0 or len(set(row_ids)) != k:
                raise RecordError(f"{sid}: position {t} top-K ids {row_ids} not distinct ids >= 0")
            _check_logps(f"teacher_topk_logp[{t}]", row_logps, sid)

    @property
    def topk(self) -> int:
        """K of the teacher's top-K (0 when absent or the response is empty)."""
        ids = self.teacher_topk_ids
        return len(ids[0]) if ids else 0

    @property
    def sample_id(self) -> str:
        return self.rollout.sample_id

    @property
    def policy_version(self) -> int:
        return self.rollout.policy_version


@dataclass(frozen=True, slots=True)
class TeacherScore:
    """What the teacher engine returns for one sequence: log π_T of each response token [R]
    and, when top-K scoring is on, its top-K token ids and log-probs [R][K] (rank order); with
    hidden-state scoring (distill.teacher_topk = "full"), its hidden states [R, H]."""

    logp_teacher: tuple[float, ...]
    topk_ids: tuple[tuple[int, ...], ...] | None = None
    topk_logp: tuple[tuple[float, ...], ...] | None = None
    hidden: Tensor | None = None

    def scored(self, rollout: Rollout) -> ScoredRollout:
        """The ScoredRollout of ``rollout`` with these scores (lengths checked there)."""
        return ScoredRollout(
            rollout=rollout,
            logp_teacher=self.logp_teacher,
            teacher_topk_ids=self.topk_ids,
            teacher_topk_logp=self.topk_logp,
            teacher_hidden=self.hidden,
        )
