"""TRL's ``DistillationTrainer`` vs opdplus on the same toy pair, prompts, batch and steps.

One invocation trains the student twice (or more), one run after the other, from the same
starting weights:

1. **TRL 1.16** ``DistillationTrainer``: on-policy student generations with transformers
   ``generate``, full-vocabulary generalized JSD (``beta`` = 0.5 for ``js``; 0 / 1 for forward /
   reverse KL), in this process. Its best CPU settings (``trl_settings``): fp32 (TRL would turn
   on bf16 autocast; the toy models are fp32 and opdplus trains them in fp32), no gradient
   checkpointing (TRL's default recomputes activations), one generation batch of the whole
   step (``per_device_train_batch_size`` = samples per step, no accumulation: one
   ``generate`` call per step), torch threads by ``trl_threads`` (one per core on an idle
   machine, one on a busy one), no dataloader workers, no logging backends, checkpoints with
   the model only (``save_only_model``). TRL's vLLM mode is
   not used: on CPU its weight sync fails (see issue 10).
2. **opdplus** ``services.driver.train`` on ``--config`` (``deploy/configs/demo.toml``) with
   ``--opdplus-set`` overrides, plus one more run per ``--extra-arm`` (e.g. the dense top-K
   arm). The bench sets only what measuring needs: a checkpoint every ``--every`` steps (the
   driver's own; the bench exports the student's HF weights at each), no in-run evaluation,
   no progress bar, no plots, no Ray dashboard.

Both sides get the same prompts (the config's prompt source and ``run.seed``, drawn step by
step: each step's ``rollout.prompts_per_step`` prompts, each repeated
``rollout.samples_per_prompt`` times for TRL, which samples one completion per row), the same
batch, steps, lr (constant), AdamW betas and weight decay, gradient clip, temperature and
``rollout.max_tokens`` completion tokens. TRL's prompts are encoded by
``rollout.prompting.encode_prompt`` like opdplus's (TRL's own tokenization would drop the BOS
the toy models were trained with).

Every checkpoint (and the starting student, once) is judged by the same evaluation,
``services.eval_command.evaluate_model_dir`` (what ``opdplus eval`` runs): ``task.eval_size``
held-out problems, greedy accuracy and avg@``eval.samples`` at temperature 1, in a child
process after each side's training (an in-process vLLM engine pins OpenMP threads and sets
variables that later Ray workers would inherit).

Clocks. Training time is each run's training loop only, checkpoint pauses excluded: TRL from
``on_train_begin`` to each checkpoint step's ``on_step_end``, less the time spent saving
earlier checkpoints; opdplus from the start of step 1 (``time/wall - time/step`` of step 1 in
``metrics.jsonl``) to the start of each checkpoint step's checkpoint, less earlier pauses
(the driver's checkpoint, whose seconds its ``RunHooks.on_checkpoint`` event reports, + the
bench's HF export in that hook; the rollout of the next step may run on during that pause, a
fraction of a second per checkpoint at this size). Start-up (TRL: building the
trainer; opdplus: Ray, the engines, the learner and the driver's own first evaluation) is
reported apart. Figures:

- samples/s = steps x samples per step / training time;
- greedy accuracy (and avg@k) at every checkpoint;
- training time to the first checkpoint at >= 0.80 and >= 0.90 greedy;
- accuracy at equal wall time: at T = the shorter run's training time, each side's greedy
  accuracy at its last checkpoint reached by T;
- opdplus/TRL ratios (samples/s: higher is better; times: lower is better).

    .venv/bin/python bench/peer_trl.py                          # 150 steps, every 25
    .venv/bin/python bench/peer_trl.py --extra-arm "distill.teacher_topk=8"
    .venv/bin/python bench/peer_trl.py --quick                  # smoke run: tiny pair, 4 steps

Needs TRL: ``pip install -e .[bench] -c constraints.txt``. Writes
``bench/results/peer_trl-<timestamp>.json`` and ``peer_trl-latest.json``
(``peer_trl_smollm2-*`` for ``--pair smollm2``).

This file is the command line and the order of the runs; the sides, the evaluation and the
figures are in ``bench/peer/`` (``trl_side``, ``opdplus_side``, ``evaluate``, ``report``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import REPO, RESULTS, benchmark, prepare_process, smollm_pair, toy_pair
from peer import BenchError
from peer.evaluate import evaluate_dirs
from peer.opdplus_side import arm_configs, run_opdplus
from peer.report import compare, print_curves, side_figures, table
from peer.trl_side import require_trl, run_trl, training_prompts, trl_beta

NAME = "peer_trl"
# Per pair, the opdplus config. TRL runs in fp32 on both (its fastest CPU precision: on the
# SmolLM2 pair its 6 steps took 130 s in fp32 and 147 s with bf16 autocast, bench/README; the
# toy models are fp32 and their steps too small for autocast to pay). `--trl-set bf16=true`.
PAIRS = {
    "toy": REPO / "deploy/configs/demo.toml",
    "smollm2": REPO / "deploy/configs/smollm2.toml",
}


@dataclass(frozen=True)
class Sizes:
    steps: int
    every: int
    prompts_per_step: int
    samples_per_prompt: int
    max_tokens: int
    eval_problems: int
    eval_k: int


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="learner steps per run (150; quick 4)")
    p.add_argument("--every", type=int, default=None, help="checkpoint every N steps (25; quick 2)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny pair, 4 steps, 8 x 2")
    p.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="toy",
        help="toy (the demo's pair) or smollm2 (real weights, built by `opdplus smollm2`)",
    )
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="opdplus config (default: the pair's, deploy/configs/demo.toml or smollm2.toml)",
    )
    p.add_argument(
        "--no-eval",
        dest="evaluate",
        action="store_false",
        help="train only: samples/s and memory, no checkpoint evaluation",
    )
    p.add_argument(
        "--opdplus-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for every opdplus run (repeatable), e.g. distill.teacher_topk=8",
    )
    p.add_argument(
        "--extra-arm",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="one more opdplus run with these space-separated overrides (repeatable)",
    )
    p.add_argument(
        "--trl-beta", type=float, default=None, help="TRL's beta (default: from distill.divergence)"
    )
    p.add_argument(
        "--trl-threads",
        type=int,
        default=0,
        help="torch threads for TRL (0: auto, one per core on an idle machine, else 1)",
    )
    p.add_argument(
        "--trl-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one of TRL's DistillationConfig fields (repeatable; TOML value)",
    )
    p.add_argument("--work", type=Path, default=None, help="keep run folders here (default: temp)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder for {NAME}-*.json")
    args = p.parse_args(argv)
    args.trl_overrides = dict(_trl_override(p, text) for text in args.trl_set)
    if args.quick and args.pair != "toy":
        p.error("--quick runs the tiny pair; it does not combine with --pair")
    args.config = args.config or PAIRS[args.pair]
    args.steps = args.steps or (4 if args.quick else 150)
    args.every = args.every or (2 if args.quick else 25)
    if args.steps < 1 or args.every < 1:
        p.error("--steps and --every must be >= 1")
    return args


def _trl_override(p: argparse.ArgumentParser, text: str) -> tuple[str, object]:
    import tomllib

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        p.error(f"--trl-set {text!r}: expected KEY=VALUE, e.g. gradient_checkpointing=true")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word
    return key.strip(), value


def smollm_pair_or_exit():
    """The SmolLM2 pair from the cache (built on first use, see `opdplus smollm2`)."""
    pair, why = smollm_pair()
    if pair is None:
        raise BenchError(f"the SmolLM2 pair is not available: {why}")
    return pair


# --------------------------------------------------------------------------- memory


class MemoryWatch:
    """The machine's used memory (``psutil.virtual_memory().used``) sampled every 0.2 s while
    a side trains; ``report()``: its peak less what was used when the watch began, in GiB.
    System-wide on purpose: opdplus's engines and learner live in Ray worker processes, TRL in
    this one, and both are charged the same way (start-up and training; evaluation is after)."""

    def __init__(self, every_s: float = 0.2):
        import threading

        self.every_s, self._stop = every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.base = self.peak = 0

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __enter__(self) -> MemoryWatch:
        import psutil

        self.base = self.peak = psutil.virtual_memory().used
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict:
        gib = 1 << 30
        return {"base_gib": self.base / gib, "peak_added_gib": (self.peak - self.base) / gib}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prepare_process()
    trl_version = require_trl()
    pair = smollm_pair_or_exit() if args.pair == "smollm2" else toy_pair(args.quick)
    cfgs = arm_configs(args, pair.student_dir, pair.teacher_dir)
    cfg = cfgs["opdplus"]
    beta = trl_beta(args, cfg.distill.divergence)
    r = cfg.rollout
    sizes = Sizes(
        steps=args.steps,
        every=args.every,
        prompts_per_step=r.prompts_per_step,
        samples_per_prompt=r.samples_per_prompt,
        max_tokens=r.max_tokens,
        eval_problems=cfg.task.eval_size,
        eval_k=cfg.eval.samples,
    )
    meta = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "pair": {
            "name": pair.name,
            "student": str(pair.student_dir),
            "teacher": str(pair.teacher_dir),
        },
        "trl": trl_version,
        "config": str(args.config),
        "opdplus_set": args.opdplus_set,
        "extra_arms": args.extra_arm,
        "trl_set": args.trl_set,
        "trl_threads": args.trl_threads,
        "evaluate": args.evaluate,
    }
    with contextlib.ExitStack() as stack:
        work = args.work or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="peer_trl-"))
        )
        work.mkdir(parents=True, exist_ok=True)
        # Per pair, so that the SmolLM2 race does not replace the toy report that
        # bench/divergences.py reads TRL's row from.
        name = NAME if args.pair == "toy" else f"{NAME}_{args.pair}"
        with benchmark(name, args, table, sizes, **meta) as report:
            measure(
                report,
                cfgs,
                beta=beta,
                every=args.every,
                threads=args.trl_threads,
                trl_overrides=args.trl_overrides,
                evaluate=args.evaluate,
                work=work,
                out=args.out,
                report_name=name,
            )
        print_curves(report)


def measure(
    report: dict,
    cfgs: dict,
    *,
    beta: float,
    every: int,
    threads: int,
    trl_overrides: dict,
    work: Path,
    out: Path,
    evaluate: bool = True,
    report_name: str = NAME,
) -> None:
    """Train and evaluate one side after the other (TRL first: its torch threads must run
    before any in-process vLLM engine, which pins OpenMP threads); a partial JSON
    (``<report_name>-partial.json``, figures so far) is rewritten after every phase.
    ``evaluate`` False: no checkpoint is judged (samples/s and memory only)."""
    cfg = cfgs["opdplus"]
    partial = out / f"{report_name}-partial.json"
    out.mkdir(parents=True, exist_ok=True)
    batch = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    runs = report["runs"] = {}
    start: dict = {}

    def evaluate_run(name: str, *, with_start: bool = False) -> None:
        checkpoints = runs[name]["checkpoints"]
        dirs = [Path(cfg.models.student)] * with_start + [Path(c["dir"]) for c in checkpoints]
        results = evaluate_dirs(dirs, cfg) if evaluate else [{} for _ in dirs]
        if with_start:
            start.update(results.pop(0))
            report["start"] = start
        for c, result in zip(checkpoints, results, strict=True):
            c.update(result)
        figs = report["figures"] = {n: side_figures(r, start, batch) for n, r in runs.items()}
        report["comparison"] = {n: compare(figs["trl"], f) for n, f in figs.items() if n != "trl"}
        report["stage"] = f"{name} evaluated"
        partial.write_text(json.dumps(report, indent=2, default=str))

    print(f"[{NAME}] TRL: {cfg.run.steps} steps ...", flush=True)
    prompts = training_prompts(cfg)
    with MemoryWatch() as memory:
        runs["trl"] = run_trl(
            cfg,
            prompts,
            beta=beta,
            every=every,
            threads=threads,
            out_dir=work / "trl",
            overrides=trl_overrides,
        )
    runs["trl"]["memory"] = memory.report()
    print(f"[{NAME}] evaluating the start and TRL's checkpoints ...", flush=True)
    evaluate_run("trl", with_start=True)
    for name, arm in cfgs.items():
        print(f"[{NAME}] {name}: {arm.run.steps} steps, then its checkpoints ...", flush=True)
        with MemoryWatch() as memory:
            runs[name] = run_opdplus(name, arm, every=every, out_dir=work)
        runs[name]["memory"] = memory.report()
        evaluate_run(name)
    report["stage"] = "done"
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()


if __name__ == "__main__":
    main()
