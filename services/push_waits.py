"""The driver's waits for a weight push (``messages.WaitPush``), and when each is answered.

A wait for version v is answered once every live sampler serves v or newer, except while the
samplers settle after a collective push: one starting or syncing then gets the weights only from
the driver's next push (services/weight_publisher.py), which this wait would hold up. A
replacement still starting is waited for (it joins with the pushed weights), but no longer than
a start may take (``ray.placement_timeout_s``): one left pending does not block every push. When
the producer stops, every wait still open fails with the reason.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass

from services.pool import STARTING, SYNCING, Pool
from services.versions import Versions


@dataclass(frozen=True)
class _Wait:
    version: int  # the last published version when the driver asked
    reply: Future
    since: float  # the producer's clock


class PushWaits:
    """The open waits. start_s: how long a (re)started worker may take to start (0 = no limit)."""

    def __init__(self, start_s: float = 0.0) -> None:
        self.start_s = start_s
        self.open: list[_Wait] = []

    def add(self, version: int, reply: Future, since: float) -> None:
        self.open.append(_Wait(version, reply, since))

    def check(self, samplers: Pool, versions: Versions, now: float) -> None:
        """Answer (None) every wait whose version the live samplers serve."""
        live = samplers.live()
        settling = not versions.external and any(
            w.state in (STARTING, SYNCING) for w in samplers.workers
        )
        keep = []
        for wait in self.open:
            grace = not self.start_s or now - wait.since <= self.start_s
            patient = settling and (not live or grace)
            if all(w.version >= wait.version for w in live) and not patient:
                wait.reply.set_result(None)
            else:
                keep.append(wait)
        self.open = keep

    def fail(self, exc: BaseException) -> None:
        """Fail every wait not yet answered with ``exc``."""
        for wait in self.open:
            if not wait.reply.done():
                wait.reply.set_exception(exc)
