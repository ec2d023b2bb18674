"""Chaos: a 20-step run in which a seeded schedule kills a random sampler or scorer after
every 5th step (4 kills, from the driver's ``on_step`` hook) finishes with a clean ledger. Weights go
over gloo (``rollout.sync_backend = "gloo"``, the collective path): a replaced sampler joins a
re-formed weight group at a push before it samples (the object store's restarts are the same
pool and producer; its pushes are covered by the e2e runs). Prints, per kill, the prompt
groups handed out again and the seconds the step lost (its time/step minus the median of the
steps without a kill); the figures also go to <run_dir>/chaos.json."""

from __future__ import annotations

import json
import random
import re
import statistics
import time

import pytest
from run_helpers import small_config, step_rows

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

STEPS, EVERY, MAX_KILLS, SEED = 20, 5, 4, 1234


def test_run_survives_seeded_kills_with_clean_ledger(ray_local, toy_pair, tmp_path, capsys):
    import ray

    from services.driver import RunHooks, train
    from services.ledger import check_ledger

    run_dir = tmp_path / "chaos"
    cfg = small_config(
        toy_pair,
        tmp_path,
        "chaos",
        STEPS,
        **{
            "rollout.num_samplers": 2,
            "rollout.num_scorers": 2,
            "rollout.max_restarts": 10,
            "rollout.dispatch_groups": 1,
            "rollout.sampler_cpus": 0.1,
            "rollout.scorer_cpus": 0.1,
            "rollout.sync_backend": '"gloo"',
        },
    )
    rng = random.Random(SEED)
    kills: list[dict] = []

    def chaos_monkey(step: int, row: dict) -> None:
        """After steps EVERY - 1, 2 EVERY - 1, ...: kill a random sampler or scorer of this
        test's own Ray namespace (nothing another test or run started)."""
        if step % EVERY != EVERY - 1 or len(kills) >= MAX_KILLS:
            return
        names = sorted(
            a
            for a in ray.util.list_named_actors()
            if a.startswith(("student-sampler-", "teacher-scorer-"))
        )
        rng.shuffle(names)
        for victim in names:  # one just killed may still be listed while it is replaced
            try:
                ray.kill(ray.get_actor(victim), no_restart=False)
            except ValueError:
                continue
            kills.append({"after_step": step, "worker": victim})
            return

    t0 = time.time()
    train(cfg, progress=False, hooks=RunHooks(on_step=chaos_monkey))
    wall = time.time() - t0

    got = step_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    report = check_ledger(run_dir)
    assert report.ok, report.problems
    assert len(kills) == MAX_KILLS, kills
    assert got[-1]["rollout/restarts"] >= len(kills)
    reforms = [
        float(s)
        for s in re.findall(
            r"gloo weight group re-formed with \d+ sampler\(s\) in ([\d.]+) s",
            capsys.readouterr().out,
        )
    ]
    sampler_kills = sum(k["worker"].startswith("student-sampler-") for k in kills)
    assert len(reforms) >= sampler_kills, (reforms, kills)

    hit = {k["after_step"] + 1 for k in kills}
    quiet = [r["time/step"] for r in got if r["step"] not in hit and r["step"] > 2]
    median = statistics.median(quiet)
    redispatched = {r["step"]: r["rollout/redispatched_groups"] for r in got}
    figures = []
    for k in kills:
        s = k["after_step"] + 1
        row = next(r for r in got if r["step"] == s)
        before = redispatched.get(s - 1, 0)
        after = redispatched.get(min(s + 1, STEPS), redispatched[STEPS])
        figures.append(
            {
                "worker": k["worker"],
                "step": s,
                "redispatched_groups": after - before,
                "seconds_lost": round(row["time/step"] - median, 3),
            }
        )
    summary = {
        "steps": STEPS,
        "kills": figures,
        "median_step_s": round(median, 3),
        "wall_s": round(wall, 1),
        "restarts": got[-1]["rollout/restarts"],
        "redispatched_groups": got[-1]["rollout/redispatched_groups"],
        "reform_s": reforms,
        "retried_samples": report.retried_samples,
        "per_sampler": report.per_sampler,
        "per_scorer": report.per_scorer,
    }
    (run_dir / "chaos.json").write_text(json.dumps(summary, indent=2))
    print("\nCHAOS " + json.dumps(summary))
