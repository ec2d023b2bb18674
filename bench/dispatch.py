"""Dispatch benchmark: chunks cut by measured speed vs fixed equal shares, when one of two
samplers is slow.

The rollout tier alone (``services.rollout_service.RolloutService``: samplers, one scorer and
the producer; no learner, no weight pushes) produces batches back to back on the toy pair
(``--quick``: the tiny pair), one Ray session for every case. One of the two samplers is slowed
on purpose: its student engine sleeps ``slow_group_delay_s`` (0.3 s) before each prompt group
it hands on (``common.SlowSamplerSpec`` wraps the engine spec; production code knows nothing of
it). Cases, all with ``rollout.dispatch_groups`` (prompt groups per chunk):

- **fast sampler alone** (the baseline): one sampler, ``dispatch_groups = 0``;
- **fixed equal shares**: fast + slow, ``dispatch_groups = prompts_per_step // 2``, each sampler
  one half of a step: what the former static dispatch amounted to;
- **dynamic**: fast + slow, ``dispatch_groups = 0`` (auto: a free sampler takes a share of the
  step in proportion to its measured groups/s).

Figure: seconds per batch, the mean over the batches after the first ``warmup_steps`` (engine
warm-up; no speed is measured yet); ratio = the baseline's s/batch over the case's (1x: as fast
as the fast sampler alone, which is the most a slow sampler added should cost). Also the
samples each sampler produced.

    .venv/bin/python bench/dispatch.py            # toy pair, 6 batches per case
    .venv/bin/python bench/dispatch.py --quick    # smoke test: tiny pair, 3 batches of 8 x 4

Writes ``<out>/dispatch-<timestamp>.json`` and ``dispatch-latest.json``. Arguments are parsed
before torch, vLLM or Ray is imported.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from common import Pair, Row, SlowSamplerSpec, pickle_by_value, run, toy_engine_settings, toy_pair

NAME = "dispatch"
SAMPLERS = "student-sampler"  # services.rollout_service names sampler slot i "<SAMPLERS>-i"
SLOW_SAMPLER = f"{SAMPLERS}-1"  # slot 1: the second sampler (the fast one alone is slot 0)


@dataclass(frozen=True)
class Sizes:
    """Workload of each case; ``--quick`` makes fewer and smaller batches."""

    steps: int = 6
    warmup_steps: int = 1
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    max_tokens: int = 32
    slow_group_delay_s: float = 0.3


QUICK = Sizes(steps=3, prompts_per_step=8, max_tokens=16)


def cases(sz: Sizes) -> dict[str, tuple[str, int, int]]:
    """key → (label, samplers, dispatch_groups); the first is the baseline."""
    half = sz.prompts_per_step // 2
    return {
        "fast_alone": ("fast sampler alone", 1, 0),
        "fixed_shares": (f"fixed equal shares (dispatch_groups = {half}), fast + slow", 2, half),
        "dynamic": ("dynamic (dispatch_groups = 0), fast + slow", 2, 0),
    }


TARGETS = {"fast_alone": "baseline", "fixed_shares": "—", "dynamic": "> fixed shares; 1x ideal"}


def run_case(pair: Pair, sz: Sizes, samplers: int, groups: int) -> dict:
    """Seconds per batch (after warm-up) of the rollout tier producing batches back to back."""
    from transformers import AutoTokenizer

    from rollout.prompting import encode_prompt
    from rollout.sources import make_source
    from services.rollout_service import RolloutPlan, RolloutService

    batch = sz.prompts_per_step * sz.samples_per_prompt
    plan = RolloutPlan(
        prompts_per_step=sz.prompts_per_step,
        samples_per_prompt=sz.samples_per_prompt,
        max_tokens=sz.max_tokens,
        temperature=1.0,
        max_staleness=sz.steps,  # no weight pushes here: only the producer's pace counts
        channel_capacity=batch,  # at most one batch ahead of the consumer
        sync_timeout_s=120,
        seed=0,
        dispatch_groups=groups,
    )
    student = SlowSamplerSpec(
        toy_engine_settings(pair.student_dir), sz.slow_group_delay_s, SLOW_SAMPLER
    )
    svc = RolloutService(
        student_settings=student,
        teacher_settings=toy_engine_settings(pair.teacher_dir),
        num_samplers=samplers,
        num_scorers=1,
        sampler_resources={"num_cpus": 0.1},
        scorer_resources={"num_cpus": 0.1},
        plan=plan,
    )
    tok = AutoTokenizer.from_pretrained(str(pair.student_dir))
    try:
        svc.start(
            make_source("arithmetic", seed=0),
            lambda text: encode_prompt(tok, text),
            first_step=1,
            last_step=sz.steps,
        )
        times = []
        for step in range(1, sz.steps + 1):
            t0 = time.perf_counter()
            svc.next_batch(step, timeout=600)
            times.append(time.perf_counter() - t0)
        stats = svc.worker_metrics()
    finally:
        svc.stop()
    steady = times[sz.warmup_steps :]
    return {
        "s_per_batch": statistics.fmean(steady),
        "s_per_batch_each": steady,
        "samples_per_sampler": {
            k.split("/")[1]: v
            for k, v in sorted(stats.items())
            if k.startswith(f"worker/{SAMPLERS}") and k.endswith("/samples")
        },
    }


def measure(report: dict, sz: Sizes, args: argparse.Namespace) -> None:
    import ray

    pair = toy_pair(args.quick)
    report["meta"].update(
        pair=pair.name,
        student=str(pair.student_dir),
        teacher=str(pair.teacher_dir),
        slow_sampler=SLOW_SAMPLER,
    )
    pickle_by_value()  # the samplers' actors unpickle the SlowSamplerSpec
    report["cases"] = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for key, (label, samplers, groups) in cases(sz).items():
            print(f"[{NAME}] {label} ...", flush=True)
            report["cases"][key] = {
                "label": label,
                "samplers": samplers,
                "dispatch_groups": groups,
                **run_case(pair, sz, samplers, groups),
            }
    finally:
        ray.shutdown()
    base = report["cases"]["fast_alone"]["s_per_batch"]
    report["speed_vs_fast_alone"] = {
        key: base / case["s_per_batch"] for key, case in report["cases"].items()
    }


def table(report: dict) -> list[Row]:
    sz = report["meta"]["sizes"]
    rows: list[Row] = [
        (
            "batch; slow sampler's delay",
            f"{sz['prompts_per_step']} x {sz['samples_per_prompt']}; "
            f"{sz['slow_group_delay_s']} s per group",
            "",
        )
    ]
    for key, case in report["cases"].items():
        ratio = report["speed_vs_fast_alone"][key]
        rows.append(
            (f"{case['label']}: s/batch", f"{case['s_per_batch']:.2f} ({ratio:.2f}x)", TARGETS[key])
        )
        samples = " / ".join(str(v) for v in case["samples_per_sampler"].values())
        rows.append(("  samples per sampler (fast / slow)", samples, ""))
    return rows


def main(argv: list[str] | None = None) -> None:
    run(
        NAME,
        __doc__,
        measure,
        table,
        (Sizes(), QUICK),
        "tiny pair, 3 batches of 8 prompts x 4 samples (smoke test)",
        smollm=False,
        argv=argv,
    )


if __name__ == "__main__":
    main()
