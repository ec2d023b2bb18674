"""The sample ledger (``<run_dir>/samples.jsonl``) and its checker.

One row per trained step: ``step`` and per-sample lists, all in the order the learner got them:
``sample_ids``, ``versions`` (policy version that sampled it), ``samplers`` / ``scorers``
(worker names), ``attempts`` (1 + earlier failed tries of its prompt group) and
``response_crc`` (CRC-32 of the sampled token ids), with several teachers ``teachers`` (the
[[teachers]] name of the teacher that scored it); ``skipped_tokens``: prompts the run's source
skipped so far for being too long in tokens (rollout.sources.TokenLimitedSource).

``check_ledger(run_dir)`` proves what a run trained on: every step 1..N appears once, holds
exactly the batch the prompt source deals for that step (replayed from the run's config.toml:
``prompts_per_step`` prompts × ``samples_per_prompt`` ids each, as a multiset: a random source
may deal one problem twice), no sample id appears more often in the run than the source dealt
it, and every sample respects ``rollout.max_staleness``. ``opdplus ledger RUN_DIR`` runs it.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from services.errors import UserError
from services.versions import step_staleness, trained_at

COLUMNS = ("versions", "samplers", "scorers", "attempts", "response_crc", "teachers")


def response_crc(rollout) -> int:
    """A checksum of the sampled tokens (resume exactness is checked on it). An episode's
    response holds the environment's answers too, and its student mask is added, so a
    re-dispatched or resumed episode must replay the same tool answers at the same places."""
    text = ",".join(map(str, rollout.response_ids))
    if rollout.episode is not None:
        text += "|" + "".join(map(str, rollout.student_mask))
    return zlib.crc32(text.encode())


def ledger_row(batch) -> dict:
    """The ledger row of one trained ``services.channel.Batch`` (module docstring)."""
    return {
        "step": batch.step,
        "sample_ids": [s.sample_id for s in batch.samples],
        "versions": [s.policy_version for s in batch.samples],
        "samplers": [p.sampler for p in batch.provenance],
        "scorers": [p.scorer for p in batch.provenance],
        "attempts": [p.attempt for p in batch.provenance],
        "response_crc": [response_crc(s.rollout) for s in batch.samples],
        "skipped_tokens": int((batch.source_state or {}).get("skipped_tokens", 0)),
    } | _teachers_column(batch)


def _teachers_column(batch) -> dict:
    teachers = [p.teacher for p in batch.provenance]
    return {"teachers": teachers} if any(teachers) else {}


@dataclass
class LedgerReport:
    steps: int = 0
    samples: int = 0
    retried_samples: int = 0  # attempt > 1: their group was handed out again after a death
    per_sampler: dict = field(default_factory=dict)
    per_scorer: dict = field(default_factory=dict)
    per_teacher: dict = field(default_factory=dict)  # samples each teacher scored (several)
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class LedgerError(UserError, ValueError):
    """A folder is not a run directory, or its ledger cannot be read; names the file."""


def read_ledger(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise LedgerError(f"{run_dir} is not a run directory with a ledger (no {path.name})")
    from services.metrics import TornFileError, read_rows

    try:
        return read_rows(path)  # a half-written last row (a crash) is dropped with a warning
    except TornFileError as exc:
        raise LedgerError(str(exc)) from None


def check_ledger(run_dir: Path, *, replay: bool = True) -> LedgerReport:
    """Check ``run_dir``'s ledger (see module docstring); problems are listed, not raised."""
    from services.config import load_config

    run_dir = Path(run_dir)
    rows = read_ledger(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise LedgerError(f"{run_dir} has a ledger but no config.toml to replay it against")
    cfg = load_config(run_dir / "config.toml", [])
    r = cfg.rollout
    report = LedgerReport(steps=len(rows))
    bad = report.problems.append
    steps = [row["step"] for row in rows]
    if steps != list(range(1, len(rows) + 1)):
        bad(f"steps are {steps}, expected 1..{len(rows)} each once in order")
    tokens = any(row.get("skipped_tokens", 0) for row in rows)
    owners: dict[str, str] = {}  # sample id → the teacher its prompt's row names
    expected = _replay(cfg, max(steps, default=0), tokens=tokens, owners=owners) if replay else None
    seen: Counter = Counter()
    sampler_n: Counter = Counter()
    scorer_n: Counter = Counter()
    teacher_n: Counter = Counter()
    for row in rows:
        step, ids = row["step"], row["sample_ids"]
        if len(ids) != r.prompts_per_step * r.samples_per_prompt:
            bad(
                f"step {step}: {len(ids)} samples, expected {r.prompts_per_step * r.samples_per_prompt}"
            )
        for col in COLUMNS:
            if col in row and len(row[col]) != len(ids):
                bad(f"step {step}: column {col} has {len(row[col])} entries for {len(ids)} samples")
        dealt_here = expected.get(step) if expected is not None else None
        # Multisets: a random source may deal one problem twice in a step (128 arithmetic
        # prompts a step often do), each time with its own samples under the same ids.
        if dealt_here is not None and Counter(ids) != dealt_here:
            missing = sorted((dealt_here - Counter(ids)).elements())[:3]
            extra = sorted((Counter(ids) - dealt_here).elements())[:3]
            bad(f"step {step}: not its batch (missing {missing}, unexpected {extra})")
        seen.update(ids)
        for v in row.get("versions", []):
            lag = step_staleness(step, v)
            if lag < 0:
                bad(
                    f"step {step}: a sample of version {v}, newer than the learner's {trained_at(step)}"
                )
            elif lag > r.max_staleness:
                bad(f"step {step}: a sample of version {v} (staleness {lag} > {r.max_staleness})")
        sampler_n.update(row.get("samplers", []))
        scorer_n.update(row.get("scorers", []))
        teacher_n.update(row.get("teachers", []))
        if cfg.teachers and "teachers" not in row:
            bad(f"step {step}: no teachers column, but the config has [[teachers]]")
        elif cfg.teachers and expected is not None:
            wrong = [
                f"{sid} by {got} (its row names {owners.get(sid, cfg.teachers[0].name)})"
                for sid, got in zip(ids, row["teachers"], strict=False)
                if got != owners.get(sid, cfg.teachers[0].name)
            ]
            if wrong:
                bad(f"step {step}: scored by the wrong teacher: {', '.join(wrong[:3])}")
        report.retried_samples += sum(a > 1 for a in row.get("attempts", []))
        report.samples += len(ids)
    # A random prompt source may deal the same problem again in a later step (its id is the
    # problem); a sample id may appear as often as the source dealt it, never more.
    dealt = sum((expected or {}).values(), Counter())
    twice = [sid for sid, n in seen.items() if n > max(1, dealt[sid])]
    if twice:
        bad(f"{len(twice)} sample ids appear more often than dealt, e.g. {twice[:3]}")
    report.per_sampler, report.per_scorer = dict(sampler_n), dict(scorer_n)
    report.per_teacher = dict(teacher_n)
    _check_teachers(cfg, teacher_n, bad)
    return report


def _check_teachers(cfg, teacher_n: Counter, bad) -> None:
    """Several teachers: every sample names a configured teacher (none without [[teachers]])."""
    names = {t.name for t in cfg.teachers}
    unknown = sorted(set(teacher_n) - names)
    if unknown:
        bad(f"samples scored by teachers {unknown}, not among the config's {sorted(names)}")


def _replay(cfg, steps: int, *, tokens: bool, owners: dict | None = None) -> dict[int, Counter]:
    """The sample ids the prompt source deals for each step 1..steps of this config; with
    ``tokens`` (the run skipped prompts too long in tokens) through the same token-length
    filter, which needs the student's tokenizer (without it the deal is the same)."""
    from services.parts import build_source

    source = build_source(cfg)
    if tokens:
        from models.pairs import resolve_pair
        from services.config import teacher_entries
        from services.driver import run_source
        from services.parts import load_tokenizer

        first = teacher_entries(cfg)[0].model
        student = resolve_pair(first, cfg.models.student, progress=False).student
        source = run_source(cfg, source, load_tokenizer(student))
    n, k = cfg.rollout.samples_per_prompt, cfg.rollout.prompts_per_step
    dealt = {}
    for step in range(1, steps + 1):
        problems = source.next_batch(k)
        dealt[step] = Counter(f"{p.id}/{i}" for p in problems for i in range(n))
        if owners is not None:  # ``owners``: filled with sample id → its row's teacher
            owners.update(
                (f"{p.id}/{i}", p.teacher) for p in problems if p.teacher for i in range(n)
            )
    return dealt
