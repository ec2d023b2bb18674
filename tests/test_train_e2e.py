"""End to end on real Ray + vLLM-CPU + DeepSpeed-CPU with the toy pair: learning, metrics,
run directory, strict on-policy mode, and resume after a killed run."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
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

    cfg = load_config(REPO / "deploy/configs/demo.toml", _overrides(toy_pair, tmp_path, "e2e", 20))
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
    assert all(0 <= r["step"] - 1 - v <= 1 for r in samples for v in r["versions"])
    for name in ("config.toml", "summary.json", "divergence.png", "loss.png"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "latest").is_file()
    assert (run_dir / "student" / "config.json").is_file()
    assert summary.eval_before["n_problems"] == 100 and summary.eval_after["n_problems"] == 100


def test_strictly_on_policy_has_unit_importance_weights(ray_local, toy_pair, tmp_path):
    from services.config import load_config
    from services.driver import train

    cfg = load_config(
        REPO / "deploy/configs/demo.toml",
        _overrides(toy_pair, tmp_path, "onpolicy", 4, **{"rollout.max_staleness": 0}),
    )
    summary = train(cfg, progress=False)
    rows = [r for r in _rows(Path(summary.run_dir)) if "learner/loss" in r]
    for r in rows:
        assert r["rollout/staleness"] == [0] * 64
        assert r["distill/is_truncated_frac"] == 0.0
        assert abs(r["distill/is_weight_mean"] - 1.0) < 1e-4
        assert r["distill/mismatch"] < 1e-4


def _train_cmd(cfg_sets: list[str], resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "services.cli", "train", "--config", "deploy/configs/demo.toml"]
    for s in cfg_sets:
        cmd += ["--set", s]
    return cmd + (["--resume"] if resume else [])


def test_resume_after_kill_repeats_and_skips_nothing(toy_pair, tmp_path, ray_local):
    """A run killed mid-way and resumed trains on exactly the uninterrupted run's samples."""
    ray_local.shutdown()  # the CLI runs start their own Ray; keep the 2 CPUs for them
    env = {**os.environ, "OPDPLUS_CACHE": str(Path(toy_pair.teacher_dir).parents[2])}
    steps = 7
    full = _overrides(toy_pair, tmp_path, "full", steps, **{"ray.dashboard": "false"})
    subprocess.run(
        _train_cmd(full), cwd=REPO, env=env, check=True, capture_output=True, timeout=900
    )

    cut = _overrides(toy_pair, tmp_path, "cut", steps, **{"ray.dashboard": "false"})
    proc = subprocess.Popen(
        _train_cmd(cut),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run_dir = tmp_path / "cut"
    deadline = time.time() + 600
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and any(
            r.get("step", 0) >= 5 and "learner/loss" in r for r in _rows(run_dir)
        ):
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: like a lost node
    proc.wait()
    # the killed driver's Ray daemons outlive it; stop them like an operator would
    subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True
    )
    # what a failed run leaves behind is intact
    assert int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1]) == 3
    assert max(r["step"] for r in _rows(run_dir)) >= 5

    out = subprocess.run(
        _train_cmd(cut, resume=True), cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    want = {r["step"]: r["sample_ids"] for r in _rows(tmp_path / "full", "samples.jsonl")}
    got = {r["step"]: r["sample_ids"] for r in _rows(run_dir, "samples.jsonl")}
    assert got == want  # same steps, same samples, nothing repeated or skipped
    steps_logged = [r["step"] for r in _rows(run_dir) if "learner/loss" in r]
    assert steps_logged == list(range(1, steps + 1))
    assert (
        run_dir / "metrics.discarded.jsonl"
    ).exists()  # the killed run's extra rows are kept aside
