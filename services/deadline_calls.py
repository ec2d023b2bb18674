"""Ray calls of one step, labelled by side, under one deadline (the collective weight sync's
control plane, services/nccl_sync.py).

Every call of a step is waited on together: the first error raises ``WeightSyncError`` naming
the side that failed, and a step still unfinished at its deadline raises one naming every side
it still waits on (and those that finished). Each message ends with the caller's ``hint`` (what
to do now). After a failure ``settle`` records who finished, who failed and who is stuck.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray
from ray.exceptions import RayError

from services.versions import WeightSyncError


def check_timeout(timeout_s: float) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")


class DeadlineCalls:
    """Ray calls of one step, labelled by side; fails fast on the first error, or at the deadline."""

    def __init__(
        self,
        what: str,
        calls: dict[str, ray.ObjectRef],
        timeout_s: float,
        started: float | None = None,
        *,
        hint: str,
    ) -> None:
        self.what = what
        self.hint = hint
        self.labels = {ref: label for label, ref in calls.items()}
        self.order = list(calls.values())
        self.timeout_s = timeout_s
        # A step that continues an earlier one (setup's join after the address) shares its clock.
        self.started = time.monotonic() if started is None else started
        self.deadline = self.started + timeout_s
        self.results: dict[str, Any] = {}
        self.failed: dict[str, BaseException] = {}  # label -> the error it raised

    def poll(self, block: bool) -> bool:
        """Collect finished calls; True once all are done. Raises WeightSyncError on failure."""
        while True:
            pending = [ref for ref in self.order if self.labels[ref] not in self.results]
            if pending:
                ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
                # In submission order: an export error is reported under the export's label
                # rather than under the receivers whose arguments it also failed.
                done = set(ready)
                for ref in pending:
                    if ref in done:
                        self._collect(ref)
                pending = [ref for ref in pending if ref not in done]
            if not pending:
                return True
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise WeightSyncError(self._timeout_message(pending))
            if not block:
                return False
            ray.wait(pending, num_returns=1, timeout=remaining)

    def _collect(self, ref: ray.ObjectRef) -> None:
        label = self.labels[ref]
        try:
            self.results[label] = ray.get(ref)
        except RayError as exc:
            self.failed[label] = exc
            raise WeightSyncError(f"{self.what}: {label} failed: {exc}; {self.hint}") from exc

    def settle(self, until: float) -> None:
        """Wait until ``until`` (monotonic) at most for the pending calls, recording each answer
        or error without raising (after a failure: who finished, who failed, who is stuck)."""
        refs = [ref for ref in self.order if self.labels[ref] in self.pending()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=max(0.0, until - time.monotonic()))
        for ref in refs:
            if ray.wait([ref], timeout=0)[0]:
                with contextlib.suppress(WeightSyncError):  # recorded in self.failed
                    self._collect(ref)

    def pending(self) -> list[str]:
        """Labels of the calls that have neither answered nor failed yet."""
        return [
            label
            for label in self.labels.values()
            if label not in self.results and label not in self.failed
        ]

    def _timeout_message(self, pending: list[ray.ObjectRef]) -> str:
        waiting = [self.labels[ref] for ref in pending]
        done = [label for label in self.labels.values() if label in self.results]
        return (
            f"{self.what} did not finish within {self.timeout_s:g} s: still waiting on "
            f"{', '.join(waiting)}"
            + (f" (finished: {', '.join(done)})" if done else "")
            + f"; {self.hint}"
        )
