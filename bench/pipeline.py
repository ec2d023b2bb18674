"""Pipeline benchmark: overlapped (max_staleness = 1) vs strictly sequential (max_staleness = 0)
training, and where each step's time goes.

Both runs happen in this process, one after the other (``services.driver.train`` starts and
stops its own Ray each time), on ``deploy/configs/demo.toml`` with the same overrides:
``--steps`` steps (12; ``--quick``: 5), 32 prompts x 4 samples per step, no TensorBoard, no
plots, no dashboard, no checkpoint before the last step, a small eval set. Only
``rollout.max_staleness`` differs. The driver always evaluates before and after training and
checkpoints after the last step; none of that is in the figures, which are computed from the
per-step rows of ``<run_dir>/metrics.jsonl`` only.

Steady state = the steps after the first ``WARMUP_STEPS`` (2; engine and allocator warm-up).
Its wall time ``W`` is the sum of ``time/step`` over those steps (a step is timed from the
learner asking for its batch to the end of its weight push; the few milliseconds of logging
between steps are not counted).

Figures, per run:

1. **samples/s** = samples trained on in the steady-state steps / ``W``. The headline is the
   ratio overlapped / sequential (goal >= 1.3x).
2. **Busy fraction of each role** over ``W`` (seconds the role was busy / ``W``):
   (``time/sample`` and ``time/score`` as ``services/rollout_service.py`` books them:)
   - sampling: ``time/sample`` per sampler: wall time of each sampler stream from launch to
     its last chunk (the student engine generating);
   - scoring: ``time/score`` per scorer: seconds the teacher engine spent inside
     ``TeacherScorer.score``. Chunks are scored while the sampler keeps generating, so
     sampling and scoring overlap and their fractions are not additive;
   - training: ``time/train`` (the driver's ``learner.train_step`` call: collate, send,
     compute, merge) and its pure-compute part ``learner/step_time_s`` (forward, backward and
     optimizer step measured inside the rank; the slowest rank when there are several);
   - weight sync: ``time/sync``: export from learner rank 0 and ``ray.put`` (object-store
     path). The samplers load the weights asynchronously afterwards; that load is not in
     ``time/sync`` but delays the next batch, so it shows up in the learner's wait.
   ``time/sample`` and ``time/score`` are booked to the step whose row is written after the
   stream ends; in the overlapped run the steady-state window can hold one batch more or less
   than it has steps (error <= 1 / steady steps).
3. **Where the learner's step goes** (these add up to 100 % of ``W``): waiting for its batch
   (``time/wait``), training compute (``learner/step_time_s``), actor-call / serialisation
   overhead (``time/train`` - ``learner/step_time_s``), weight sync (``time/sync``), other
   (the rest of ``time/step``: building the metrics row). In the sequential run the wait is
   the whole rollout of the batch plus the samplers' weight load and the producer noticing
   it (admission control).
4. **Goals**: learner busy (training compute, ``learner/step_time_s``) >= 80 % of wall time;
   weight sync <= 5 % of step time.
5. **What a GPU cluster changes**: on this 2-core machine all roles share the same CPUs, so
   overlapping them mostly reorders work rather than adding compute. The section prints which
   roles would get their own devices and an *estimate* of the overlapped step there,
   max(rollout, train + sync), from the sequential run's figures (its ``time/wait`` is the
   whole rollout of a batch, since nothing overlaps it).

Run from the repository root::

    .venv/bin/python bench/pipeline.py                       # toy pair, 12 steps per run
    .venv/bin/python bench/pipeline.py --quick --models tiny # smoke test (5 steps, tiny model)

Results: a table on stdout, ``<out>/pipeline-<timestamp>.json`` and
``<out>/pipeline-latest.json``. Arguments are parsed before torch, vLLM or Ray is imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import REPO, RESULTS, machine_info, prepare_process, save

CONFIG = REPO / "deploy" / "configs" / "demo.toml"
SPEEDUP_TARGET = 1.3  # overlapped samples/s over sequential samples/s
LEARNER_BUSY_TARGET = 0.80  # learner compute seconds over steady-state wall seconds
SYNC_TARGET = 0.05  # weight-sync seconds over step seconds
STALENESS = {"overlapped": 1, "sequential": 0}


@dataclass(frozen=True)
class Sizes:
    """Workload of each run; ``--quick`` runs fewer steps."""

    steps: int = 12
    warmup_steps: int = 2  # dropped from the figures: engine and allocator warm-up
    prompts_per_step: int = 32
    samples_per_prompt: int = 4
    eval_size: int = 16  # the driver's before/after eval: kept small, never timed here


# --------------------------------------------------------------------------- environment


def load_avg() -> float:
    return os.getloadavg()[0]


def model_folders(choice: str) -> tuple[Path, Path]:
    """(teacher, student) folders, built or taken from the cache before any run is timed."""
    from models.common import cache_dir
    from models.pairs import resolve_pair

    if choice == "tiny":
        from models.toy import build_tiny_model

        tiny = Path(build_tiny_model(cache_dir() / "models" / "tiny", progress=False))
        return tiny, tiny
    pair = resolve_pair("toy", "toy", progress=True)
    return pair.teacher, pair.student


# --------------------------------------------------------------------------- runs


def overrides(
    sizes: Sizes, teacher: Path, student: Path, out_dir: Path, name: str, staleness: int
) -> list[str]:
    sets = {
        "run.name": f'"{name}"',
        "run.out_dir": f'"{out_dir}"',
        "run.steps": sizes.steps,
        # Only the final (untimed) checkpoint: the driver always saves after the last step.
        "run.checkpoint_every": sizes.steps + 1,
        "models.teacher": f'"{teacher}"',
        "models.student": f'"{student}"',
        "rollout.prompts_per_step": sizes.prompts_per_step,
        "rollout.samples_per_prompt": sizes.samples_per_prompt,
        "rollout.max_staleness": staleness,
        "task.eval_size": sizes.eval_size,
        "eval.samples": 1,
        "log.plots": "false",
        "log.tensorboard": "false",
        "log.progress": "false",
        "ray.dashboard": "false",
    }
    return [f"{k}={v}" for k, v in sets.items()]


def run_one(label: str, sets: list[str], warmup_steps: int) -> dict:
    """Train once; return the steady-state figures of its per-step rows."""
    from services.config import load_config
    from services.driver import train
    from services.metrics import read_metrics

    cfg = load_config(CONFIG, sets)
    load_start, t0 = load_avg(), time.perf_counter()
    summary = train(cfg, progress=False)
    wall = time.perf_counter() - t0
    rows = [r for r in read_metrics(Path(summary.run_dir) / "metrics.jsonl") if "time/step" in r]
    result = steady_state(
        rows,
        warmup_steps,
        num_samplers=cfg.rollout.num_samplers,
        num_scorers=cfg.rollout.num_scorers,
    )
    result.update(
        label=label,
        max_staleness=cfg.rollout.max_staleness,
        run_wall_s=wall,
        load_avg_start=load_start,
        load_avg_end=load_avg(),
        run_dir=summary.run_dir,
    )
    return result


def steady_state(
    rows: list[dict], warmup_steps: int, *, num_samplers: int, num_scorers: int
) -> dict:
    """Figures 1-3 over the rows after the first ``warmup_steps`` steps."""
    steady = [r for r in rows if r["step"] > warmup_steps]
    if not steady:
        raise ValueError(f"no steady-state steps: {len(rows)} steps, {warmup_steps} dropped")

    def total(key: str) -> float:
        return sum(r[key] for r in steady)

    wall = total("time/step")
    wait, train, sync = total("time/wait"), total("time/train"), total("time/sync")
    compute = total("learner/step_time_s")
    # perf/* are per-step rates over time/step; multiplying back recovers the counts.
    samples = sum(r["perf/samples_per_s"] * r["time/step"] for r in steady)
    tokens = sum(r["perf/tokens_per_s"] * r["time/step"] for r in steady)
    return {
        "steady_steps": [r["step"] for r in steady],
        "wall_s": wall,
        "samples": round(samples),
        "samples_per_s": samples / wall,
        "tokens_per_s": tokens / wall,
        "step_s_median": statistics.median(r["time/step"] for r in steady),
        "staleness_mean": statistics.fmean(r["rollout/staleness_mean"] for r in steady),
        "busy": {
            "sampling": total("time/sample") / num_samplers / wall,
            "scoring": total("time/score") / num_scorers / wall,
            "training": train / wall,
            "training_compute": compute / wall,
            "weight_sync": sync / wall,
        },
        "step_split": {
            "learner_wait": wait / wall,
            "train_compute": compute / wall,
            "train_overhead": (train - compute) / wall,
            "weight_sync": sync / wall,
            "other": (wall - wait - train - sync) / wall,
        },
        "per_step_s": {  # means over the steady-state steps
            k: total(k) / len(steady)
            for k in (
                "time/step",
                "time/wait",
                "time/train",
                "learner/step_time_s",
                "time/sync",
                "time/sample",
                "time/score",
            )
        },
        "rows": [
            {
                k: r[k]
                for k in (
                    "step",
                    "time/step",
                    "time/wait",
                    "time/train",
                    "learner/step_time_s",
                    "time/sync",
                    "time/sample",
                    "time/score",
                    "rollout/staleness_mean",
                )
            }
            for r in rows
        ],
    }


def gpu_projection(seq: dict) -> dict:
    """Overlapped step on separate devices, estimated from the sequential run: max(rollout,
    train + sync), where the sequential learner's wait is the whole rollout of its batch."""
    per = seq["per_step_s"]
    rollout = per["time/wait"]
    learner = per["time/train"] + per["time/sync"]
    step = max(rollout, learner)
    return {
        "rollout_s": rollout,
        "learner_s": learner,
        "overlapped_step_s": step,
        "speedup_over_sequential": per["time/step"] / step,
        "learner_busy": per["learner/step_time_s"] / step,
    }


# --------------------------------------------------------------------------- output


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_report(report: dict) -> None:
    ov, sq = report["runs"]["overlapped"], report["runs"]["sequential"]
    meta, goals = report["meta"], report["goals"]
    sizes = meta["sizes"]
    print(
        f"\npipeline benchmark: models {meta['models']}, {sizes['steps']} steps per run, "
        f"{sizes['prompts_per_step']} prompts x {sizes['samples_per_prompt']} samples per step; "
        f"steady state = steps {ov['steady_steps'][0]}-{ov['steady_steps'][-1]}"
    )
    loads = [r[k] for r in (ov, sq) for k in ("load_avg_start", "load_avg_end")]
    cores = meta["cpu_count"]
    print(
        f"load average (1 min) during the runs: {min(loads):.1f}-{max(loads):.1f} on {cores} "
        f"cores" + ("  -- BUSY MACHINE, figures are skewed" if max(loads) > cores else "")
    )

    w = 46
    print(f"\n{'figure':<{w}}  {'overlapped':>11}  {'sequential':>11}  goal")
    print(f"{'max_staleness':<{w}}  {ov['max_staleness']:>11}  {sq['max_staleness']:>11}")
    print(
        f"{'staleness mean (steady state)':<{w}}  {ov['staleness_mean']:>11.2f}  "
        f"{sq['staleness_mean']:>11.2f}"
    )
    print(f"{'steady-state wall s':<{w}}  {ov['wall_s']:>11.1f}  {sq['wall_s']:>11.1f}")
    print(f"{'median step s':<{w}}  {ov['step_s_median']:>11.2f}  {sq['step_s_median']:>11.2f}")
    print(
        f"{'1. samples/s':<{w}}  {ov['samples_per_s']:>11.1f}  {sq['samples_per_s']:>11.1f}  "
        f"ratio {goals['speedup']:.2f}x (>= {SPEEDUP_TARGET}x: {verdict(goals['speedup_ok'])})"
    )
    print(f"{'   tokens/s':<{w}}  {ov['tokens_per_s']:>11.0f}  {sq['tokens_per_s']:>11.0f}")

    busy_rows = [
        ("sampling", "sampling (time/sample, per sampler)", ""),
        ("scoring", "scoring (time/score, per scorer)", ""),
        ("training", "training (time/train)", ""),
        ("training_compute", "  of which compute (learner/step_time_s)", "learner_busy"),
        ("weight_sync", "weight sync (time/sync)", "sync"),
    ]
    print("2. busy fraction of steady-state wall time")
    for key, name, goal in busy_rows:
        print(
            f"{'   ' + name:<{w}}  {pct(ov['busy'][key]):>11}  {pct(sq['busy'][key]):>11}  "
            + goal_text(goal, goals)
        )
    print("3. where the learner's step goes")
    split_rows = [
        ("learner_wait", "waiting for its batch (time/wait)"),
        ("train_compute", "training compute (learner/step_time_s)"),
        ("train_overhead", "actor call / serialisation (train-compute)"),
        ("weight_sync", "weight sync (time/sync)"),
        ("other", "other (rest of time/step)"),
    ]
    for key, name in split_rows:
        print(
            f"{'   ' + name:<{w}}  {pct(ov['step_split'][key]):>11}  {pct(sq['step_split'][key]):>11}"
        )

    print(
        f"\nOn this {cores}-core machine every role (vLLM sampler, vLLM scorer, DeepSpeed learner, "
        f"driver) shares the same CPUs:\noverlap can only fill the gaps where a role waits; it "
        f"cannot run two roles' compute at full speed at once,\nso the ratio here understates "
        f"what overlap gives when each role has its own device."
    )
    print_gpu_section(report["gpu_projection"])


def goal_text(goal: str, goals: dict) -> str:
    if goal == "learner_busy":
        return (
            f">= {pct(LEARNER_BUSY_TARGET)}: overlapped {verdict(goals['learner_busy_ok']['overlapped'])}"
            f", sequential {verdict(goals['learner_busy_ok']['sequential'])}"
        )
    if goal == "sync":
        return (
            f"<= {pct(SYNC_TARGET)}: overlapped {verdict(goals['sync_ok']['overlapped'])}"
            f", sequential {verdict(goals['sync_ok']['sequential'])}"
        )
    return ""


GPU_ROLES = """\
What a GPU cluster changes (e.g. deploy/configs/gpu_cluster.toml):
  - sampling: each StudentSampler's vLLM engine on its own GPU (rollout.sampler_gpus = 1),
    several samplers in parallel (rollout.num_samplers), each streaming while the learner trains;
  - scoring: each TeacherScorer's vLLM engine on its own GPU (rollout.scorer_gpus); a
    prefill-only pass, so one scorer keeps up with several samplers (rollout.num_scorers);
  - training: each DeepSpeed rank on its own GPU (learner.gpus_per_rank, learner.num_ranks),
    computing while the samplers generate the next batch instead of taking turns on 2 cores;
  - weight sync: an NCCL broadcast from learner rank 0 to the sampler GPUs
    (rollout.sync_backend = nccl) instead of an export + object-store copy + CPU reload;
  - what stays on CPU: the driver loop, the producer thread and the scoring/queueing hand-off."""


def print_gpu_section(proj: dict) -> None:
    print("\n" + GPU_ROLES)
    print(
        f"  Estimate from the sequential run (rollout {proj['rollout_s']:.2f} s, train + sync "
        f"{proj['learner_s']:.2f} s per step):\n  overlapped on separate devices, a step takes "
        f"max of the two = {proj['overlapped_step_s']:.2f} s -> "
        f"{proj['speedup_over_sequential']:.2f}x the sequential samples/s, learner busy "
        f"{pct(proj['learner_busy'])}.\n  (Assumes each role runs as fast alone as it did here "
        f"while the others idled; the balance on GPUs differs.)"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="5 steps per run instead of 12 (smoke test)"
    )
    p.add_argument(
        "--models",
        choices=("toy", "tiny"),
        default="toy",
        help="toy: the demo's toy pair (built on first use); tiny: one tiny model as "
        "teacher and student (smoke test)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per run (overrides --quick)")
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="folder for pipeline-<timestamp>.json and pipeline-latest.json",
    )
    p.add_argument(
        "--keep-runs",
        type=Path,
        default=None,
        help="write the two run directories here instead of a temporary folder",
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    sizes = Sizes(steps=args.steps or (5 if args.quick else Sizes.steps))
    if sizes.steps <= sizes.warmup_steps:
        raise SystemExit(f"--steps must exceed the {sizes.warmup_steps} warm-up steps")
    teacher, student = model_folders(args.models)
    report = {
        "meta": {
            **machine_info(),
            "models": args.models,
            "teacher": str(teacher),
            "student": str(student),
            "config": str(CONFIG),
            "sizes": asdict(sizes),
            "quick": args.quick,
        },
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="opdplus-pipeline-") as tmp:
        out_dir = args.keep_runs or Path(tmp)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for label, staleness in STALENESS.items():
            sets = overrides(sizes, teacher, student, out_dir, f"{label}-{stamp}", staleness)
            print(f"[pipeline] {label} run (max_staleness = {staleness}) ...", flush=True)
            report["runs"][label] = run_one(label, sets, sizes.warmup_steps)
            report["meta"]["overrides"] = [
                s for s in sets if not s.startswith(("run.name", "rollout.max_staleness"))
            ]
    ov, sq = report["runs"]["overlapped"], report["runs"]["sequential"]
    speedup = ov["samples_per_s"] / sq["samples_per_s"]
    report["goals"] = {
        "speedup": speedup,
        "speedup_target": SPEEDUP_TARGET,
        "speedup_ok": speedup >= SPEEDUP_TARGET,
        "learner_busy_target": LEARNER_BUSY_TARGET,
        "sync_target": SYNC_TARGET,
        "learner_busy_ok": {
            k: r["busy"]["training_compute"] >= LEARNER_BUSY_TARGET
            for k, r in report["runs"].items()
        },
        "sync_ok": {k: r["busy"]["weight_sync"] <= SYNC_TARGET for k, r in report["runs"].items()},
    }
    report["gpu_projection"] = gpu_projection(sq)
    report["meta"]["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prepare_process()
    t0 = time.perf_counter()
    report = run(args)
    report["meta"]["wall_s"] = time.perf_counter() - t0
    print_report(report)
    print(f"\nsaved {save(report, args.out, 'pipeline')} ({report['meta']['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
