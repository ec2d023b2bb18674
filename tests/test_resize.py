"""Live resizing: ``opdplus scale`` (services.control.scale) grows a running job from 1 to 2
samplers and back to 1; the new sampler gets the current weights before its first chunk, the
removed one drains, and the ledger stays clean. The operator thread ends the run with a Ctrl-C
once it has seen both changes (a new engine's start-up time varies a lot with the load), so
the test also covers the clean stop."""

from __future__ import annotations

import _thread
import threading
import time

import pytest
from run_helpers import rows, small_config, step_rows

pytestmark = pytest.mark.slow


def _wait(run_dir, pred, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            got = step_rows(run_dir)
        except (FileNotFoundError, ValueError):  # not written yet / a line being written
            got = []
        if got and pred(got):
            return got
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run")


def test_scale_samplers_one_two_one_during_a_run(ray_local, toy_pair, tmp_path):
    from services.control import scale
    from services.driver import RunStopped, train
    from services.ledger import check_ledger

    run_dir = tmp_path / "resize"
    cfg = small_config(toy_pair, tmp_path, "resize", 400, **{"rollout.max_staleness": 1})
    log: list = []

    def operator():
        try:
            _wait(run_dir, lambda r: r[-1]["step"] >= 2)
            log.append(("up", scale(run_dir, samplers=2, scorers=None)))
            _wait(run_dir, lambda r: r[-1].get("worker/student-sampler-1/samples", 0) > 0)
            log.append(("down", scale(run_dir, samplers=1, scorers=None)))
            at = step_rows(run_dir)[-1]["step"]
            _wait(run_dir, lambda r: r[-1]["rollout/num_samplers"] == 1 and r[-1]["step"] > at + 3)
        except BaseException as exc:  # reported by the assertions below (after the run)
            log.append(("error", repr(exc)))
            return
        _thread.interrupt_main()  # Ctrl-C, once the run is in its loop

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    with pytest.raises(RunStopped, match="interrupted"):
        train(cfg, progress=False)
    t.join(timeout=5)
    assert [k for k, _ in log] == ["up", "down"], log
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
    # staleness bound held for the new sampler too: it loaded the current weights first
    ledger = rows(run_dir, "samples.jsonl")
    for r in ledger:
        for v, who in zip(r["versions"], r["samplers"], strict=True):
            assert 0 <= r["step"] - 1 - v <= 1, (r["step"], v, who)
