"""Policy-version arithmetic: its values, and that it lives only in services/versions.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOME = "services/versions.py"
# What a copy of the arithmetic looks like: the version a step trains at, a staleness lag, the
# oldest admissible version, or a definition of one of them.
COPIES = [
    re.compile(r"\bstep\s*-\s*1\b"),
    re.compile(r"[-+]\s*(?:[\w.]+\.)?max_staleness\b"),
    re.compile(r"^def\s+(?:trained_at|staleness|step_staleness|need|published_after)\b"),
    re.compile(r"\bpolicy_version\b\s*[-+]|[-+]\s*\w+\.policy_version\b"),
    re.compile(r"\"policy_version\":\s*step\b"),
]


def copies_of_version_arithmetic(source: str) -> list[int]:
    """Line numbers of ``source`` that restate the version arithmetic."""
    return [
        i
        for i, line in enumerate(source.splitlines(), 1)
        if not line.lstrip().startswith("#") and any(p.search(line) for p in COPIES)
    ]


def test_version_values():
    from services.calls import LocalCalls
    from services.pool import Worker
    from services.versions import (
        Versions,
        WeightSyncError,
        need,
        published_after,
        step_staleness,
        trained_at,
    )

    assert trained_at(5) == 4 and published_after(5) == 5 and need(5, 1) == 3
    assert step_staleness(5, 4) == 0 and step_staleness(5, 2) == 2
    assert need(1, 0) == 0 and need(7, 0) == 6
    v = Versions(LocalCalls(), max_staleness=1, sync_timeout_s=10)
    assert v.admits(5, 3) and not v.admits(5, 2)
    w = Worker("student-sampler-0", 0, object(), version=2)
    assert not v.may_take(w, 5)
    w.loading = 3  # a load queued on the actor runs before any chunk sent after it
    assert v.may_take(w, 5)
    v.publish("weights-v4", 4)
    with pytest.raises(WeightSyncError, match="not newer"):
        v.publish("weights-v4-again", 4)


def test_a_collective_version_reaches_only_the_group_that_received_it():
    """A collective push makes current exactly the samplers it reached; one outside the group
    (a replacement, an added one) is not current: it waits for the next push and cannot load
    the version alone (the object-store path loads it)."""
    from services.calls import LocalCalls
    from services.pool import Worker, WorkerFailed
    from services.versions import Versions, WeightSyncError

    v = Versions(LocalCalls(), max_staleness=0, sync_timeout_s=10)
    member = Worker("student-sampler-0", 0, object())
    joined = Worker("student-sampler-1", 1, object())  # started after the group formed
    assert not v.awaits_push(joined)  # version 0: the initial weights it was built with
    v.mark_external(3, [member])
    assert member.version == 3 and joined.version == 0
    assert v.awaits_push(joined) and not v.awaits_push(member)
    assert not v.may_take(joined, 4) and v.may_take(member, 4)
    with pytest.raises(WorkerFailed, match="next push"):
        v.load(joined)
    v.mark_external(3, [member, joined])  # the re-formed group's repeat of version 3
    assert joined.version == 3 and not v.awaits_push(joined)
    with pytest.raises(WeightSyncError, match="older"):
        v.mark_external(2, [member])
    v.publish("weights-v4", 4)  # the object store: a sampler behind loads it itself
    assert not v.awaits_push(Worker("student-sampler-2", 2, object()))


def test_version_arithmetic_has_one_home():
    found = [
        f"{path.relative_to(ROOT)}:{line}"
        for folder in ("rollout", "learner", "services")  # models/ has no policy versions
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.relative_to(ROOT).as_posix() != HOME
        for line in copies_of_version_arithmetic(path.read_text())
    ]
    assert not found, f"version arithmetic outside {HOME} (call it instead): {found}"
    assert copies_of_version_arithmetic((ROOT / HOME).read_text())  # the patterns still match


@pytest.mark.parametrize(
    "planted",
    [
        "    trained = step - 1",
        "    lag = (step-1) - v",
        "    oldest = trained_at(step) - self.max_staleness",
        "def staleness(a, b):",
        "    stale = [step - s.policy_version for s in batch]",
        '    state = {"policy_version": step}',
    ],
)
def test_the_one_home_check_catches_a_planted_copy(planted):
    source = f"def f(step, batch, v):\n{planted}\n"
    assert copies_of_version_arithmetic(source) == [2]
