"""Scoring benchmark: seconds the teacher's ``TeacherEngine.score`` takes for the student's
samples, over the seconds the student's ``StudentEngine.generate`` took to sample them
(target <= 25 %), on the toy pair and on the SmolLM2 pair.

The student samples the batch at temperature 1 (seeded per prompt, one warm-up call
excluded): that call's time is the baseline. The teacher then scores exactly those prompt +
response tokens (one warm-up scoring call on 8 samples excluded). Student and teacher engines
stay open together until both are done (closing one in-process engine breaks the other).

Run from the repository root::

    .venv/bin/python bench/scoring.py                          # toy pair, then SmolLM2 pair
    .venv/bin/python bench/scoring.py --quick --skip-smollm    # smoke test: tiny pair only

Results: a table on stdout, ``<out>/scoring-<timestamp>.json`` and ``scoring-latest.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from common import (
    Pair,
    arithmetic_prompts,
    count_params,
    cpu_state,
    open_engine,
    run,
    smollm_engine_settings,
    smollm_pair,
    toy_engine_settings,
    toy_pair,
    vllm_sampling,
)

NAME = "scoring"
TARGET = 0.25  # teacher scoring seconds over student sampling seconds


@dataclass(frozen=True)
class Sizes:
    toy_batch: int = 128
    toy_tokens: int = 40
    smol_batch: int = 64
    smol_tokens: int = 64


QUICK = Sizes(toy_batch=32, toy_tokens=16, smol_batch=8, smol_tokens=16)


def score_pair(pair: Pair, settings, batch: int, new_tokens: int) -> dict:
    """Sample ``batch`` prompts with the student, then score them with the teacher."""
    from rollout.engine import StudentEngine, TeacherEngine

    prompts = arithmetic_prompts(pair.student_dir, batch)
    with (
        open_engine(StudentEngine, settings(pair.student_dir)) as (student, _),
        open_engine(TeacherEngine, settings(pair.teacher_dir)) as (teacher, _),
    ):
        sampling, gens = vllm_sampling(student, prompts, new_tokens=new_tokens)
        responses = [list(g.token_ids) for g in gens]
        teacher.score(prompts[:8], responses[:8])
        t0 = time.perf_counter()
        teacher.score(prompts, responses)
        seconds = time.perf_counter() - t0
        dtype = teacher.settings.dtype
    return {
        "teacher": str(pair.teacher_dir),
        "teacher_params": count_params(pair.teacher_dir),
        "dtype": dtype,
        "sequences": len(prompts),
        "scored_tokens": sum(map(len, prompts)) + sum(map(len, responses)),
        "response_tokens": sum(map(len, responses)),
        "score_s": seconds,
        "sample_s": sampling["seconds"],
        "fraction": seconds / sampling["seconds"],
        "target": TARGET,
        "meets_target": seconds / sampling["seconds"] <= TARGET,
        "student_sampling": sampling,
        **cpu_state(),
    }


def measure(report: dict, sizes: Sizes, args: argparse.Namespace) -> None:
    toy = toy_pair(args.quick)
    report["scoring"] = {
        toy.name: score_pair(toy, toy_engine_settings, sizes.toy_batch, sizes.toy_tokens)
    }
    smol, skipped = smollm_pair(args.skip_smollm)
    if smol is None:
        report["skipped"] = {"smollm2": skipped}
        return
    report["scoring"]["smollm2"] = score_pair(
        smol, smollm_engine_settings, sizes.smol_batch, sizes.smol_tokens
    )


def table(report: dict) -> list[tuple[str, str, str]]:
    return [
        (
            f"scoring {name} ({s['teacher_params'] / 1e6:.1f} M-param teacher): "
            f"{s['score_s']:.2f} s / sampling {s['sample_s']:.2f} s",
            f"{100 * s['fraction']:.0f}%",
            f"<= {100 * TARGET:.0f}%",
        )
        for name, s in report.get("scoring", {}).items()
    ]


def main(argv: list[str] | None = None) -> None:
    quick_help = "tiny models, small batches (smoke test)"
    run(NAME, __doc__, measure, table, (Sizes(), QUICK), quick_help, smollm=True, argv=argv)


if __name__ == "__main__":
    main()
