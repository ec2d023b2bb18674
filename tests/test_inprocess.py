"""The in-process mode: the same driver with the rollout tier as plain objects in this process
(no sampler or scorer actors), so a developer can step through a real run with a debugger."""

from __future__ import annotations

import pytest
from run_helpers import rows, small_config, step_rows

pytestmark = pytest.mark.slow


def test_driver_runs_with_in_process_rollout(ray_local, toy_pair, tmp_path, monkeypatch):
    import services.pool
    from services.driver import train
    from services.ledger import check_ledger

    def no_ray(*a, **k):
        raise AssertionError("the in-process mode must not call rollout workers through Ray")

    monkeypatch.setattr(services.pool.RayCalls, "__init__", no_ray)
    cfg = small_config(toy_pair, tmp_path, "inproc", 3, **{"rollout.in_process": "true"})
    summary = train(cfg, progress=False)
    run_dir = tmp_path / "inproc"
    assert [r["step"] for r in step_rows(run_dir)] == [1, 2, 3]
    assert summary.eval_after["n_problems"] == 4  # evaluation ran on the producer's sampler
    ledger = rows(run_dir, "samples.jsonl")
    assert {s for r in ledger for s in r["samplers"]} == {"student-sampler-0"}
    assert {s for r in ledger for s in r["scorers"]} == {"teacher-scorer-0"}
    report = check_ledger(run_dir)
    assert report.ok, report.problems
    assert step_rows(run_dir)[-1]["worker/student-sampler-0/samples"] == 3 * 4 * 2
