"""Live resizing: ``opdplus scale`` (services.control.scale) grows a running job from 1 to 2
samplers and back to 1; the new sampler gets the current weights before its first chunk, the
removed one drains, and the ledger stays clean. The run syncs weights over gloo
(``rollout.sync_backend = "gloo"``, the collective path): each change re-forms the weight group
at a push, and, strictly on-policy, every step's samples — the added sampler's included — have
the learner's log-probs (``distill/mismatch``), so no sampler ever sampled with stale weights.
(The object-store path's resizing is the same producer; its pushes are covered by the e2e runs.) The operator acts on the run's own events (the
driver's ``on_step`` hook) and ends the run with a Ctrl-C once it has seen both changes, so the
test also covers the clean stop; nothing waits on a clock."""

from __future__ import annotations

import re

import pytest
from run_helpers import rows, small_config, step_rows

pytestmark = pytest.mark.slow


class _Operator:
    """Scales up after step 2, down once the new sampler has delivered, stops once the weight
    group has re-formed without the drained sampler (at least 4 steps later)."""

    def __init__(self, run_dir) -> None:
        self.run_dir, self.log, self.down_at = run_dir, [], None

    def on_step(self, step: int, row: dict) -> None:
        from services.control import scale

        phase = [k for k, *_ in self.log]
        if not phase and step >= 2:
            self.log.append(("up", step, scale(self.run_dir, samplers=2, scorers=None)))
        elif phase == ["up"] and row.get("worker/student-sampler-1/samples", 0) > 0:
            self.log.append(("down", step, scale(self.run_dir, samplers=1, scorers=None)))
            self.down_at = step
        elif (
            phase == ["up", "down"]
            and row["rollout/num_samplers"] == 1
            and row["sync/group_samplers"] == 1  # the group has re-formed without the drained one
            and step > self.down_at + 3
        ):
            self.log.append(("stop", step, None))
            raise KeyboardInterrupt  # Ctrl-C, from inside the run's loop


def test_scale_samplers_one_two_one_during_a_run(ray_local, toy_pair, tmp_path, capsys):
    from services.driver import RunHooks, RunStopped, train
    from services.ledger import check_ledger

    run_dir = tmp_path / "resize"
    cfg = small_config(
        toy_pair,
        tmp_path,
        "resize",
        400,
        **{"rollout.max_staleness": 0, "rollout.sync_backend": '"gloo"'},
    )
    op = _Operator(run_dir)
    try:
        train(cfg, progress=False, hooks=RunHooks(on_step=op.on_step))
    except RunStopped as exc:
        assert "interrupted" in str(exc), (str(exc), op.log)
    else:
        pytest.fail(f"the run trained all its steps; the operator saw: {op.log}")
    assert [k for k, _, _ in op.log] == ["up", "down", "stop"], op.log
    reforms = re.findall(
        r"gloo weight group re-formed with (\d+) sampler\(s\) in ([\d.]+) s",
        capsys.readouterr().out,
    )
    print("\nRESIZE re-forms (samplers, seconds):", reforms)
    assert [n for n, _ in reforms] == ["2", "1"], reforms  # up, then down
    got = step_rows(run_dir)
    steps = len(got)
    sizes = [r["rollout/num_samplers"] for r in got]
    assert 2 in sizes and sizes[-1] == 1, sizes
    assert sizes.index(2) > 0 and sizes[: sizes.index(2)] == [1] * sizes.index(2)
    last = got[-1]
    assert last["worker/student-sampler-0/samples"] > 0
    assert last["worker/student-sampler-1/samples"] > 0
    total = last["worker/student-sampler-0/samples"] + last["worker/student-sampler-1/samples"]
    assert total >= steps * 4 * 2  # the producer may have delivered one step beyond the last
    report = check_ledger(run_dir)
    assert report.ok, report.problems
    assert set(report.per_sampler) == {"student-sampler-0", "student-sampler-1"}
    # staleness bound held for the new sampler too: it got the current weights first
    from services.versions import step_staleness

    ledger = rows(run_dir, "samples.jsonl")
    for r in ledger:
        for v, who in zip(r["versions"], r["samplers"], strict=True):
            assert step_staleness(r["step"], v) == 0, (r["step"], v, who)
    # ... and those weights were the learner's: its log-probs of every step's samples equal
    # the samplers' (as tests/test_gloo_sync.py's run, to the object-store path's tolerance)
    for r in got:
        assert r["distill/mismatch"] < 1e-4, (r["step"], r["distill/mismatch"])
