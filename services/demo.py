"""The README's main job: toy models → evaluate → OPD+ → evaluate → a before/after table."""

from __future__ import annotations

import dataclasses
import time

from services.config import Config


def run_demo(cfg: Config) -> None:
    from models.pairs import resolve_pair
    from services.console import say
    from services.driver import train
    from services.eval_command import cached_teacher_eval
    from services.parts import build_source

    t0 = time.perf_counter()
    name = f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name))
    say(
        f"[opdplus] demo: toy teacher → toy student, {cfg.distill.divergence} with "
        f"{cfg.distill.estimator}, {cfg.run.steps} steps; run dir {cfg.run.out_dir}/{name}",
    )
    pair = resolve_pair(cfg.models.teacher, cfg.models.student, progress=cfg.log.progress)
    problems = build_source(cfg).eval_set()[: cfg.task.eval_size]
    teacher = cached_teacher_eval(
        pair.teacher, problems, k=cfg.eval.samples, max_tokens=cfg.eval.max_tokens
    )
    summary = train(cfg)
    say(format_table(cfg, teacher, summary, time.perf_counter() - t0))


def _acc(result: dict | None) -> str:
    if not result:
        return "n/a"
    lo, hi = result["greedy_ci"]
    return f"{result['greedy_acc']:.3f}  [95% CI {lo:.3f}–{hi:.3f}]  avg@{result['k']} {result['avg_at_k']:.3f}"


def format_table(cfg: Config, teacher: dict, summary, total_s: float) -> str:
    rows = [
        ("teacher accuracy (greedy)", _acc(teacher)),
        ("student before", _acc(summary.eval_before)),
        ("student after", _acc(summary.eval_after)),
        (
            "divergence (first → last steps)",
            f"{summary.divergence_first:.4f} → {summary.divergence_last:.4f}  ({cfg.distill.divergence}, per token)",
        ),
        (
            "steps / training wall time",
            f"{summary.steps} steps, {summary.wall_s:.0f} s (demo total {total_s:.0f} s)",
        ),
        ("run directory", summary.run_dir),
        ("plots", ", ".join(summary.plots) or "none"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [
        "",
        "OPD+ demo — held-out arithmetic, "
        + f"{summary.eval_after['n_problems'] if summary.eval_after else '?'} problems",
    ]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)
