"""Several teachers for one student: which teacher scores each prompt, and which scorers are
whose (pure: no Ray, no engines).

A run's teachers are the ``[[teachers]]`` entries of its config, or the one implicit teacher
``models.teacher`` (``services.config.teacher_entries``). A prompt belongs to the teacher its
data row names (``rollout.sources.Problem.teacher``, the ``teacher`` field of a jsonl or chat
row); a row that names none belongs to the first entry. The scorers form one pool
(``services.pool``) whose slots are laid out teacher by teacher: the first teacher's
``num_scorers`` slots, then the next one's, so a scorer restarted in its slot scores for the
same teacher. The producer (``services/producer.py``) hands a sampled prompt group only to a
scorer of the group's teacher (``Routes.accepts``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rollout.sources import SourceError


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher as the rollout tier needs it: its name, its engines' settings (a
    ``rollout.engine.EngineSettings``), how many scorers and the Ray options of each."""

    name: str
    settings: Any
    num_scorers: int
    resources: dict


class UnknownTeacher(SourceError):
    """A prompt names a teacher the run does not have: bad data, which a resume would replay
    (so, as every SourceError, the run stops without a resume command)."""


class Routes:
    """Prompt → teacher and scorer slot → teacher.

    teachers: (name, number of scorers) in config order; the first is the default owner."""

    def __init__(self, teachers: Sequence[tuple[str, int]]) -> None:
        if not teachers:
            raise ValueError("a run needs at least one teacher")
        names = [name for name, _ in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must differ, got {names}")
        self.names = tuple(names)
        self.default = names[0]
        self._slots: list[str] = [name for name, n in teachers for _ in range(n)]
        self._owner: dict[str, str] = {}  # problem id → teacher, for non-default owners only

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    @property
    def num_scorers(self) -> int:
        return len(self._slots)

    def slot_teacher(self, slot: int) -> str:
        """The teacher of scorer slot ``slot`` (slots past the layout cycle through it)."""
        return self._slots[slot % len(self._slots)]

    def note(self, problems: Iterable[Any]) -> None:
        """Remember who owns each of a step's problems (``Problem.teacher``; empty = default).
        A name not configured is an error naming the problem (checked again here, for data a
        source could not list at start: ``check_data``)."""
        for p in problems:
            teacher = getattr(p, "teacher", "") or self.default
            if teacher not in self.names:
                raise UnknownTeacher(_unknown(teacher, f"{p.id} ({p.source})", self.names))
            if teacher != self.default:
                self._owner[p.id] = teacher

    def teacher_of(self, problem_id: str) -> str:
        return self._owner.get(problem_id, self.default)

    def accepts(self, slot: int):
        """Predicate on a sampled group (``services.scheduler.Group``): whether the scorer in
        ``slot`` scores it."""
        mine = self.slot_teacher(slot)
        return lambda group: self.teacher_of(group.rollouts[0].problem_id) == mine


def _unknown(teacher: str, where: str, names: Sequence[str]) -> str:
    return (
        f"{where}: names teacher {teacher!r}, which is not configured; the [[teachers]] "
        f"entries are {', '.join(map(repr, names))} (a row without a teacher field goes to the "
        f"first)"
    )


def data_teachers(source) -> dict[str, str]:
    """Each teacher name the rows of ``source`` give → the first row giving it ({} for a
    source without such a field: the arithmetic and reasoning-gym sources)."""
    inner = getattr(source, "source", source)  # TokenLimitedSource / VerifiedSource wrap one
    inner = getattr(inner, "source", inner)
    teachers = getattr(inner, "teachers", None)
    return dict(teachers()) if callable(teachers) else {}


def check_data(source, names: Sequence[str]) -> None:
    """Before any engine starts: every teacher a data row names is configured (a
    ``ConfigError`` naming the row and the configured names otherwise)."""
    from services.config import ConfigError

    for teacher, where in data_teachers(source).items():
        if teacher and teacher not in names:
            raise ConfigError(_unknown(teacher, where, names))


def split_by_teacher(problems: Sequence[Any], names: Sequence[str]) -> dict[str, list]:
    """Problems grouped by their teacher (``Problem.teacher``; empty = the first of
    ``names``), in ``names`` order, each teacher present (maybe with none)."""
    out: dict[str, list] = {name: [] for name in names}
    for p in problems:
        out[getattr(p, "teacher", "") or names[0]].append(p)
    return out


def improvement(before: dict, after: dict, names: Sequence[str]) -> dict[str, dict]:
    """Each teacher's part of the student's held-out improvement, from ``evaluate_student``'s
    results before and after training (their ``teacher/<name>/…`` keys): per teacher its
    problems n_t, greedy accuracy before and after, and its share of the overall gain,
    share_t = n_t·Δacc_t / Σ_u n_u·Δacc_u (the overall accuracy is the n-weighted mean of the
    teachers', so the shares sum to 1; None when the overall gain is 0)."""
    rows = {}
    for name in names:
        n = (after or {}).get(f"teacher/{name}/n_problems")
        b, a = (
            (before or {}).get(f"teacher/{name}/greedy_acc"),
            (after or {}).get(f"teacher/{name}/greedy_acc"),
        )
        if n and b is not None and a is not None:
            rows[name] = {
                "n_problems": n,
                "greedy_before": b,
                "greedy_after": a,
                "gain": n * (a - b),
            }
    total = sum(r["gain"] for r in rows.values())
    for r in rows.values():
        r["share"] = r.pop("gain") / total if total else None
    return rows


def improvement_lines(rows: dict[str, dict]) -> list[str]:
    """One console line per teacher of ``improvement``."""
    lines = []
    for name, r in rows.items():
        share = "" if r["share"] is None else f", {100 * r['share']:.0f} % of the gain"
        lines.append(
            f"[opdplus] teacher {name}: held-out greedy {r['greedy_before']:.3f} → "
            f"{r['greedy_after']:.3f} on its {r['n_problems']} prompts{share}"
        )
    return lines
