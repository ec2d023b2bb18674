"""opdplus's side of the race: the arms' configs (the bench's settings, the pair, the shared
keys checked) and ``services.driver.train`` with a checkpoint hook that exports HF weights."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import time
from pathlib import Path

from peer import BenchError

# What the bench itself sets on every opdplus run (what measuring needs, nothing else).
BENCH_SETS = (
    "eval.every=0",
    "log.progress=false",
    "log.plots=false",
    "ray.dashboard=false",
)
QUICK_SETS = (
    "rollout.prompts_per_step=8",
    "rollout.samples_per_prompt=2",
    "task.eval_size=20",
    "eval.samples=2",
)
# Keys both sides must share; an --extra-arm may not change them.
SHARED_KEYS = (
    ("run", "seed"),
    ("run", "steps"),
    ("rollout", "prompts_per_step"),
    ("rollout", "samples_per_prompt"),
    ("rollout", "max_tokens"),
    ("rollout", "temperature"),
    ("learner", "lr"),
    ("learner", "grad_clip"),
    ("learner", "betas"),
    ("learner", "weight_decay"),
    ("learner", "lr_schedule"),
    ("learner", "warmup_steps"),
    ("task", "source"),
    ("task", "eval_size"),
    ("eval", "samples"),
    ("eval", "max_tokens"),
)


def arm_configs(args: argparse.Namespace, student: Path, teacher: Path) -> dict:
    """name → validated opdplus Config. Every arm: the bench's settings, the pair, --steps and
    --every, --opdplus-set, then the arm's own overrides."""
    from services.config import ConfigError, load_config

    base = [
        *BENCH_SETS,
        *(QUICK_SETS if args.quick else ()),
        f'models.student="{student}"',
        f'models.teacher="{teacher}"',
        f"run.steps={args.steps}",
        f"run.checkpoint_every={args.every}",
        *args.opdplus_set,
    ]
    arms = {"opdplus": base}
    for i, extra in enumerate(args.extra_arm, 1):
        sets = shlex.split(extra)
        arms[f"opdplus[{' '.join(sets)}]" if sets else f"opdplus-{i}"] = base + sets
    try:
        cfgs = {name: load_config(args.config, sets) for name, sets in arms.items()}
    except ConfigError as exc:
        raise BenchError(str(exc)) from None
    first = cfgs["opdplus"]
    for name, cfg in cfgs.items():
        for section, key in SHARED_KEYS:
            a, b = getattr(getattr(first, section), key), getattr(getattr(cfg, section), key)
            if a != b:
                raise BenchError(
                    f"{name}: {section}.{key} = {b!r} differs from the first arm's {a!r}; "
                    "both sides must share it (use --opdplus-set to change it for every run)"
                )
    return cfgs


def run_opdplus(name: str, cfg, *, every: int, out_dir: Path) -> dict:
    """Train with ``services.driver.train``; a checkpoint hook exports the student's HF weights
    after each checkpoint, and the pause (checkpoint + export) is taken out of the clock."""
    from dataclasses import replace

    from services.driver import CheckpointDone, RunHooks, train

    run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    cfg = replace(cfg, run=replace(cfg.run, name=run_name, out_dir=str(out_dir)))
    marks: list[dict] = []

    def export_hf(event: CheckpointDone) -> None:
        # Called on the driver thread right after the checkpoint is written, which took
        # event.seconds: the pause began that long ago.
        began, t0 = time.time() - event.seconds, time.perf_counter()
        hf_dir = Path(event.run_dir) / "hf" / f"step-{event.step}"
        event.learner.save_hf(hf_dir)
        pause = event.seconds + time.perf_counter() - t0
        marks.append({"step": event.step, "dir": str(hf_dir), "at": began, "pause": pause})

    t_call = time.time()
    summary = train(cfg, progress=False, hooks=RunHooks(on_checkpoint=export_hf))
    rows = [
        json.loads(x)
        for x in (Path(summary.run_dir) / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    by_step = {r["step"]: r for r in rows if "time/wall" in r}
    first = by_step[1]
    loop0 = first["time/wall"] - first["time/step"]
    checkpoints, paused = [], 0.0
    for mark in marks:
        if mark["step"] % every == 0 or mark["step"] == cfg.run.steps:
            checkpoints.append(
                {"step": mark["step"], "dir": mark["dir"], "train_s": mark["at"] - loop0 - paused}
            )
        paused += mark["pause"]
    return {
        "side": name,
        "overrides": cfg_diff(cfg),
        "startup_s": loop0 - t_call,
        "pauses_s": paused,
        "checkpoints": checkpoints,
        "run_dir": summary.run_dir,
        "divergence_first": summary.divergence_first,
        "divergence_last": summary.divergence_last,
        "loss": [{"step": s, "loss": r.get("learner/loss")} for s, r in sorted(by_step.items())],
    }


def cfg_diff(cfg) -> dict:
    """The config's keys that differ from the defaults (what this arm ran with)."""
    from dataclasses import asdict

    from services.config import Config

    def flat(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and key not in ("sampler_resources", "scorer_resources"):
                out |= flat(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value
        return out

    default, mine = flat(asdict(Config())), flat(asdict(cfg))
    return {k: v for k, v in mine.items() if default.get(k) != v}
