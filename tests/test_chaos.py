"""Chaos: a 30-step run in which a seeded schedule kills a random sampler or scorer about
every 5 steps (at most 5 kills) finishes with a clean ledger. Prints, per kill, the prompt
groups handed out again and the seconds the step lost (its time/step minus the median of the
steps without a kill); the figures also go to <run_dir>/chaos.json."""

from __future__ import annotations

import json
import random
import statistics
import threading
import time

import pytest
from run_helpers import small_config, step_rows

pytestmark = [pytest.mark.slow, pytest.mark.chaos]

STEPS, EVERY, MAX_KILLS, SEED = 30, 5, 5, 1234


def test_run_survives_seeded_kills_with_clean_ledger(ray_local, toy_pair, tmp_path):
    import ray

    from services.driver import train
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
        },
    )
    rng = random.Random(SEED)
    kills: list[dict] = []

    def chaos_monkey():
        for k in range(1, MAX_KILLS + 1):
            deadline = time.time() + 900
            while time.time() < deadline:
                try:
                    done = max((r["step"] for r in step_rows(run_dir)), default=0)
                except (FileNotFoundError, ValueError):
                    done = 0
                if done >= k * EVERY - 1:
                    break
                time.sleep(0.1)
            else:
                return
            names = sorted(
                (a["name"], a["namespace"])
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(("student-sampler-", "teacher-scorer-"))
            )
            if not names or done >= STEPS:
                return
            victim, namespace = rng.choice(names)
            try:
                ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=False)
            except ValueError:
                continue  # it was being replaced; next round
            kills.append({"after_step": done, "worker": victim, "at": time.time()})

    t = threading.Thread(target=chaos_monkey, daemon=True)
    t.start()
    t0 = time.time()
    train(cfg, progress=False)
    wall = time.time() - t0
    t.join(timeout=5)

    got = step_rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    report = check_ledger(run_dir)
    assert report.ok, report.problems
    assert len(kills) >= 3, kills
    assert got[-1]["rollout/restarts"] >= len(kills)

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
        "retried_samples": report.retried_samples,
        "per_sampler": report.per_sampler,
        "per_scorer": report.per_scorer,
    }
    (run_dir / "chaos.json").write_text(json.dumps(summary, indent=2))
    print("\nCHAOS " + json.dumps(summary))
