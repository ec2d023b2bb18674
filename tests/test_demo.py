"""``opdplus demo``'s own code on a short run: the before/after table it prints and the cached
teacher evaluation (the teacher is evaluated once per model folder and task)."""

from __future__ import annotations

import re
import shutil

import pytest
from run_helpers import small_config

pytestmark = pytest.mark.slow


def test_demo_prints_its_table_and_caches_the_teacher_eval(
    ray_local, toy_pair, tmp_path, monkeypatch, capfd
):
    from models.pairs import resolve_pair
    from services import eval_command
    from services.demo import run_demo
    from services.parts import build_source

    teacher = tmp_path / "teacher"  # a copy: the shared cache keeps its own evaluation files
    shutil.copytree(toy_pair.teacher_dir, teacher, ignore=shutil.ignore_patterns("eval-*.json"))
    cfg = small_config(
        toy_pair,
        tmp_path,
        "demo",
        2,
        **{"rollout.in_process": "true", "models.teacher": f'"{teacher}"'},
    )
    run_demo(cfg)
    table = capfd.readouterr().out
    assert "OPD+ demo — held-out arithmetic, 4 problems" in table
    for label in ("teacher accuracy (greedy)", "student before", "student after"):
        line = next(ln for ln in table.splitlines() if ln.strip().startswith(label))
        acc, lo, hi = map(
            float, re.search(r"([\d.]+)  \[95% CI ([\d.]+)–([\d.]+)\]", line).groups()
        )
        assert 0 <= lo <= acc <= hi <= 1, line
    assert re.search(
        r"divergence \(first → last steps\)\s+[\d.]+ → [\d.]+  \(js, per token\)", table
    )
    assert re.search(r"steps / training wall time\s+2 steps, \d+ s", table)

    (cached,) = teacher.glob("eval-*.json")  # the teacher's evaluation, written once
    monkeypatch.setattr(eval_command, "evaluate_model_dir", pytest.fail)  # must not run again
    problems = build_source(cfg).eval_set()[: cfg.task.eval_size]
    again = eval_command.cached_teacher_eval(
        resolve_pair(cfg.models.teacher, cfg.models.student).teacher,
        problems,
        k=cfg.eval.samples,
        max_tokens=cfg.eval.max_tokens,
    )
    assert again["greedy_acc"] == float(
        re.search(r"teacher accuracy \(greedy\)\s+([\d.]+)", table)[1]
    )
