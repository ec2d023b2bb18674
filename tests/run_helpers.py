"""Small run configs on the toy pair for the rollout-tier tests (resume, resize, chaos)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def small_config(toy_pair, out_dir: Path, name: str, steps: int, **extra):
    """deploy/configs/demo.toml with tiny batches: 4 prompts x 2 samples, 16 tokens, no eval
    during the run, no TensorBoard or plots; ``extra`` overrides keys (``"a.b": value``)."""
    from services.config import load_config

    sets = {
        "run.name": f'"{name}"',
        "run.out_dir": f'"{out_dir}"',
        "run.steps": steps,
        "run.checkpoint_every": 2,
        "models.teacher": f'"{toy_pair.teacher_dir}"',
        "models.student": f'"{toy_pair.student_dir}"',
        "rollout.prompts_per_step": 4,
        "rollout.samples_per_prompt": 2,
        "rollout.max_tokens": 16,
        "rollout.channel_capacity": 64,
        "rollout.sampler_cpus": 0.2,
        "rollout.scorer_cpus": 0.2,
        "task.eval_size": 4,
        "eval.samples": 1,
        "eval.max_tokens": 8,
        "eval.every": 0,
        "log.progress": "false",
        "log.tensorboard": "false",
        "log.plots": "false",
        "ray.num_cpus": 2,
        "ray.dashboard": "false",
    }
    sets.update(extra)
    return load_config(REPO / "deploy/configs/demo.toml", [f"{k}={v}" for k, v in sets.items()])


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / name).read_text().splitlines() if x.strip()]


def step_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "learner/loss" in r]
