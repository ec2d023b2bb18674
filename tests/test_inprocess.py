"""The in-process mode: the same driver with the rollout tier as plain objects in this process
(no sampler or scorer actors), so a developer can step through a real run with a debugger."""

from __future__ import annotations

import pytest
from run_helpers import rows, small_config, step_rows

pytestmark = pytest.mark.slow


def test_driver_runs_with_in_process_rollout(ray_local, toy_pair, tmp_path, monkeypatch):
    import services.calls
    from services.driver import train
    from services.ledger import check_ledger

    def no_ray(*a, **k):
        raise AssertionError("the in-process mode must not call rollout workers through Ray")

    monkeypatch.setattr(services.calls.RayCalls, "__init__", no_ray)
    # learner.sync_every = 2: weights are pushed after step 2 (and the last), not step 1
    cfg = small_config(
        toy_pair,
        tmp_path,
        "inproc",
        3,
        **{
            "rollout.in_process": "true",
            "learner.sync_every": 2,
            "rollout.max_staleness": 1,
            # Room for prompts of 7 tokens (24 - 16 response tokens - 1): the arithmetic
            # prompts of 8 and 9 tokens are longer than the engines' context allows. Skipped
            # and counted when a step opens, never sent to an engine.
            "rollout.max_model_len": 24,
        },
    )
    summary = train(cfg, progress=False)
    run_dir = tmp_path / "inproc"
    assert [r["step"] for r in step_rows(run_dir)] == [1, 2, 3]
    assert summary.eval_after["n_problems"] == 4  # evaluation ran on the producer's sampler
    ledger = rows(run_dir, "samples.jsonl")
    # step 3 needs version >= 1 (staleness 1), which only the push after step 2 brings
    assert [sorted(set(r["versions"])) for r in ledger] == [[0], [0], [2]]
    assert {s for r in ledger for s in r["samplers"]} == {"student-sampler-0"}
    assert {s for r in ledger for s in r["scorers"]} == {"teacher-scorer-0"}
    report = check_ledger(run_dir)
    assert report.ok, report.problems
    assert step_rows(run_dir)[-1]["worker/student-sampler-0/samples"] == 3 * 4 * 2
    skipped = [r["data/skipped_long_tokens"] for r in step_rows(run_dir)]
    assert skipped == sorted(skipped) and skipped[-1] > 0, skipped
    assert [r["skipped_tokens"] for r in ledger] == skipped  # the ledger replayed the filter
