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
``metrics.jsonl``) to the checkpoint call of each checkpoint step, less earlier checkpoint
calls (DeepSpeed checkpoint + HF export; the rollout of the next step may run on during that
pause, a fraction of a second per checkpoint at this size). Start-up (TRL: building the
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
``bench/results/peer_trl-<timestamp>.json`` and ``peer_trl-latest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import REPO, RESULTS, Row, benchmark, prepare_process, smollm_pair, toy_pair

NAME = "peer_trl"
TRL_VERSION = "1.16.0"
INSTALL_HINT = "pip install -e .[bench] -c constraints.txt"
THRESHOLDS = (0.80, 0.90)
# TRL's generalized JSD interpolates forward KL (beta 0), JS (0.5) and reverse KL (1).
TRL_BETA = {"forward_kl": 0.0, "js": 0.5, "reverse_kl": 1.0}
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
# Per pair, the opdplus config. TRL runs in fp32 on both (its fastest CPU precision: on the
# SmolLM2 pair its 6 steps took 130 s in fp32 and 147 s with bf16 autocast, bench/README; the
# toy models are fp32 and their steps too small for autocast to pay). `--trl-set bf16=true`.
PAIRS = {
    "toy": REPO / "deploy/configs/demo.toml",
    "smollm2": REPO / "deploy/configs/smollm2.toml",
}
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


@dataclass(frozen=True)
class Sizes:
    steps: int
    every: int
    prompts_per_step: int
    samples_per_prompt: int
    max_tokens: int
    eval_problems: int
    eval_k: int


class BenchError(SystemExit):
    """A problem the user can fix (missing TRL, a bad override): one line, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"peer_trl: {message}")


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


def require_trl() -> str:
    """TRL's version, or a one-line error with the install command (checked before any run)."""
    if importlib.util.find_spec("trl") is None:
        raise BenchError(f"TRL is not installed; install the bench extra: {INSTALL_HINT}")
    version = importlib.metadata.version("trl")
    if version != TRL_VERSION:
        print(f"peer_trl: TRL {version} installed, the bench pins {TRL_VERSION}", file=sys.stderr)
    return version


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


def smollm_pair_or_exit():
    """The SmolLM2 pair from the cache (built on first use, see `opdplus smollm2`)."""
    pair, why = smollm_pair()
    if pair is None:
        raise BenchError(f"the SmolLM2 pair is not available: {why}")
    return pair


def trl_beta(args: argparse.Namespace, divergence: str) -> float:
    if args.trl_beta is not None:
        return args.trl_beta
    if divergence not in TRL_BETA:
        raise BenchError(
            f"TRL's generalized JSD has no {divergence!r}; pass --trl-beta (0 forward KL, "
            "0.5 JS, 1 reverse KL)"
        )
    return TRL_BETA[divergence]


# --------------------------------------------------------------------------- prompts


def training_prompts(cfg) -> list[str]:
    """The prompt text of every sample, step by step, in the order opdplus draws them: per step
    ``source.next_batch(prompts_per_step)``, each prompt repeated ``samples_per_prompt`` times."""
    from services.parts import build_source

    source = build_source(cfg)
    r = cfg.rollout
    rows = []
    for _ in range(cfg.run.steps):
        for problem in source.next_batch(r.prompts_per_step):
            rows += [problem.prompt] * r.samples_per_prompt
    return rows


def eval_problems(cfg) -> list:
    from services.parts import build_source

    return build_source(cfg).eval_set()[: cfg.task.eval_size]


# --------------------------------------------------------------------------- TRL


def trl_trainer_class():
    """``DistillationTrainer`` whose prompts are encoded by ``rollout.prompting.encode_prompt``,
    the one place that decides how opdplus presents a prompt (TRL's ``tokenizer(text)`` adds
    no BOS for the toy tokenizer)."""
    from trl import DistillationTrainer

    from rollout.prompting import encode_prompt

    class EncodedPromptDistillationTrainer(DistillationTrainer):
        def _tokenize_prompts(self, prompts: list):
            return [encode_prompt(self._tokenizer, text) for text in prompts], None, {}

    return EncodedPromptDistillationTrainer


def run_trl(
    cfg,
    prompts: list[str],
    *,
    beta: float,
    every: int,
    threads: int,
    out_dir: Path,
    overrides: dict | None = None,
) -> dict:
    """Train with TRL; returns the settings, clocks and ``checkpoints`` [{step, dir, train_s}].
    ``overrides``: DistillationConfig fields replacing the bench's settings (``--trl-set``)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig

    threads, why = trl_threads(threads)
    torch.set_num_threads(threads)

    r, lr = cfg.rollout, cfg.learner
    batch = r.prompts_per_step * r.samples_per_prompt
    steps = cfg.run.steps
    settings = {
        "beta": beta,
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "max_steps": steps,
        "learning_rate": lr.lr,
        "lr_scheduler_type": "constant" if lr.lr_schedule == "constant" else "cosine",
        "warmup_steps": lr.warmup_steps,
        "weight_decay": lr.weight_decay,
        "adam_beta1": lr.betas[0],
        "adam_beta2": lr.betas[1],
        "max_grad_norm": lr.grad_clip if lr.grad_clip > 0 else 0.0,
        "max_completion_length": r.max_tokens,
        "temperature": r.temperature,
        "top_p": 1.0,
        "top_k": 0,
        "seed": cfg.run.seed,
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "disable_dropout": True,
        "shuffle_dataset": False,  # the rows are already in opdplus's per-step order
        "dataloader_num_workers": 0,
        "save_strategy": "steps",
        "save_steps": every,
        "save_only_model": True,
        "logging_steps": every,
        "report_to": "none",
        "disable_tqdm": True,
        "use_vllm": False,
    }
    unknown = set(overrides or {}) - set(DistillationConfig.__dataclass_fields__)
    if unknown:
        raise BenchError(f"--trl-set: DistillationConfig has no field {', '.join(sorted(unknown))}")
    settings |= overrides or {}
    clock = _TrlClock(every=every, last=steps, callback=TrainerCallback)
    t0 = time.perf_counter()
    student_dir, teacher_dir = Path(cfg.models.student), Path(cfg.models.teacher)
    tokenizer = AutoTokenizer.from_pretrained(str(student_dir), padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32)
    trainer = trl_trainer_class()(
        model=student,
        teacher_model=teacher,
        args=DistillationConfig(output_dir=str(out_dir), **settings),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        callbacks=[clock.callback],
    )
    startup_s = time.perf_counter() - t0
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    checkpoints = [
        {"step": step, "dir": str(out_dir / f"checkpoint-{step}"), "train_s": seconds}
        for step, seconds in clock.train_s.items()
    ]
    del trainer, student, teacher
    gc.collect()
    return {
        "side": "trl",
        "trl": importlib.metadata.version("trl"),
        "settings": settings,
        "torch_threads": torch.get_num_threads(),
        "threads_why": why,
        "startup_s": startup_s,
        "pauses_s": clock.paused,
        "checkpoints": checkpoints,
        "loss": [{"step": h["step"], "loss": h["loss"]} for h in history],
    }


def trl_threads(requested: int) -> tuple[int, str]:
    """TRL's torch threads. On a busy machine one thread: with two OpenMP threads on two
    contended cores TRL's step took 74 s against 5.6 s with one (toy pair, 128 x 40, load
    average ~30); on an idle machine one per core."""
    if requested:
        return requested, "--trl-threads"
    cores, load = os.cpu_count() or 1, os.getloadavg()[0]
    if load >= 1.0:
        return 1, f"auto: load average {load:.1f} >= 1 (other processes busy)"
    return cores, f"auto: load average {load:.1f} < 1 (idle machine)"


class _TrlClock:
    """Training-loop seconds at each checkpoint step, less the time spent saving earlier ones.

    transformers calls ``on_step_end`` and then saves (``on_save``); what lies between the two
    is the save (and logging, on the same steps), so it is paused time.
    """

    def __init__(self, *, every: int, last: int, callback: type):
        self.every, self.last = every, last
        self.t0 = self.t_step_end = 0.0
        self.paused = 0.0
        self.train_s: dict[int, float] = {}
        clock = self

        class Callback(callback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock.t_step_end = time.perf_counter()
                step = state.global_step
                if step % clock.every == 0 or step == clock.last:
                    clock.train_s[step] = clock.t_step_end - clock.t0 - clock.paused

            def on_save(self, args, state, control, **kwargs):
                clock.paused += time.perf_counter() - clock.t_step_end

        self.callback = Callback()


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


# --------------------------------------------------------------------------- opdplus


def run_opdplus(name: str, cfg, *, every: int, out_dir: Path) -> dict:
    """Train with ``services.driver.train``; the driver's checkpoint call also exports the
    student's HF weights, and is timed so that the pause can be taken out of the clock."""
    from dataclasses import replace

    import services.driver as driver

    run_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
    cfg = replace(cfg, run=replace(cfg.run, name=run_name, out_dir=str(out_dir)))
    marks: list[dict] = []
    original = driver.checkpoint

    def checkpoint_and_export(learner, run_dir, step, eval_before, rollout, *, keep):
        entered, t0 = time.time(), time.perf_counter()
        original(learner, run_dir, step, eval_before, rollout, keep=keep)
        hf_dir = Path(run_dir) / "hf" / f"step-{step}"
        learner.save_hf(hf_dir)
        marks.append(
            {"step": step, "dir": str(hf_dir), "at": entered, "pause": time.perf_counter() - t0}
        )

    t_call = time.time()
    driver.checkpoint = checkpoint_and_export
    try:
        summary = driver.train(cfg, progress=False)
    finally:
        driver.checkpoint = original
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


# --------------------------------------------------------------------------- evaluation


def evaluate_dirs(dirs: list[Path], cfg) -> list[dict]:
    """``evaluate_dir`` of each folder, in a child process: an in-process vLLM CPU engine
    pins this process's OpenMP threads and sets variables (``LD_PRELOAD``,
    ``LOCAL_WORLD_SIZE``) that the Ray workers of a later opdplus run would inherit."""
    import subprocess

    from services.config import to_toml

    with tempfile.TemporaryDirectory(prefix="peer_trl-eval-") as tmp:
        spec, result = Path(tmp) / "config.toml", Path(tmp) / "result.json"
        spec.write_text(to_toml(cfg))
        code = (
            "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
            "from peer_trl import eval_worker; eval_worker(*sys.argv[3:])"
        )
        argv = [sys.executable, "-c", code, str(REPO), str(Path(__file__).parent)]
        subprocess.run([*argv, str(spec), str(result), *map(str, dirs)], check=True)
        return json.loads(result.read_text())


def eval_worker(config_path: str, result_path: str, *dirs: str) -> None:
    """The child of ``evaluate_dirs``: load the config, evaluate each folder, write JSON."""
    from services.config import load_config

    prepare_process()
    cfg = load_config(config_path)
    problems = eval_problems(cfg)
    results = [evaluate_dir(Path(d), problems, cfg) for d in dirs]
    Path(result_path).write_text(json.dumps(results))


def evaluate_dir(model_dir: Path, problems: list, cfg) -> dict:
    """``opdplus eval``'s evaluation of one folder: greedy and avg@k with their 95 % CIs."""
    from services.eval_command import evaluate_model_dir

    t0 = time.perf_counter()
    result = evaluate_model_dir(
        model_dir, problems, k=cfg.eval.samples, max_tokens=cfg.eval.max_tokens, dtype="float32"
    )
    return {
        "greedy_acc": result["greedy_acc"],
        "greedy_ci": result["greedy_ci"],
        "avg_at_k": result.get("avg_at_k"),
        "avg_at_k_ci": result.get("avg_at_k_ci"),
        "eval_s": time.perf_counter() - t0,
    }


# --------------------------------------------------------------------------- figures


def side_figures(run: dict, start: dict, samples_per_step: int) -> dict:
    """samples/s, time to each threshold, and the accuracy curve (step 0 = the start)."""
    curve = [{"step": 0, "train_s": 0.0, **start}] + run["checkpoints"]
    last = run["checkpoints"][-1] if run["checkpoints"] else None
    train_s = last["train_s"] if last else None
    reach = {}
    for thr in THRESHOLDS:
        hit = next((c for c in curve if c.get("greedy_acc", -1) >= thr), None)
        reach[f"{thr:.2f}"] = None if hit is None else {"step": hit["step"], "s": hit["train_s"]}
    return {
        "train_s": train_s,
        "peak_added_gib": run.get("memory", {}).get("peak_added_gib"),
        "samples": (last["step"] * samples_per_step) if last else 0,
        "samples_per_s": (last["step"] * samples_per_step / train_s) if last and train_s else None,
        "curve": curve,
        "time_to": reach,
    }


def acc_at(curve: list[dict], seconds: float) -> dict:
    """The last checkpoint reached within ``seconds`` of training."""
    return [c for c in curve if c["train_s"] <= seconds + 1e-9][-1]


def compare(trl: dict, mine: dict) -> dict:
    """opdplus/TRL ratios: samples/s (higher is better), times to threshold (lower is better),
    and each side's greedy accuracy at the shorter run's training time."""

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = {
        "samples_per_s_ratio": ratio(mine["samples_per_s"], trl["samples_per_s"]),
        "memory_ratio": ratio(mine.get("peak_added_gib"), trl.get("peak_added_gib")),
    }
    for thr in trl["time_to"]:
        a, b = mine["time_to"][thr], trl["time_to"][thr]
        out[f"time_to_{thr}_ratio"] = ratio(a and a["s"], b and b["s"])
    if trl["train_s"] and mine["train_s"]:
        seconds = min(trl["train_s"], mine["train_s"])
        a, b = acc_at(mine["curve"], seconds), acc_at(trl["curve"], seconds)
        out["equal_time"] = {
            "s": seconds,
            "opdplus": {"step": a["step"], "greedy_acc": a.get("greedy_acc")},
            "trl": {"step": b["step"], "greedy_acc": b.get("greedy_acc")},
            "greedy_ratio": ratio(a.get("greedy_acc"), b.get("greedy_acc")),
        }
    return out


def _fmt(x, spec=".3f", none="—"):
    return none if x is None else format(x, spec)


def _reach(fig: dict, thr: str) -> str:
    hit = fig["time_to"][thr]
    return "not reached" if hit is None else f"{hit['s']:.0f} s (step {hit['step']})"


def table(report: dict) -> list[Row]:
    figs, cmp_ = report.get("figures", {}), report.get("comparison", {})
    if "trl" not in figs:
        return [("figures", "none (a run failed; see the JSON)", "")]
    trl = figs["trl"]
    rows: list[Row] = [
        ("TRL samples/s (training)", _fmt(trl["samples_per_s"], ".1f"), "baseline"),
        ("TRL start-up s", _fmt(report["runs"]["trl"]["startup_s"], ".1f"), "—"),
        ("TRL memory added (peak GiB)", _fmt(trl.get("peak_added_gib"), ".2f"), "baseline"),
    ]
    for thr in trl["time_to"]:
        rows.append((f"TRL time to {thr} greedy", _reach(trl, thr), "baseline"))
    for name, fig in figs.items():
        if name == "trl":
            continue
        c = cmp_[name]
        rows += [
            (
                f"{name} samples/s",
                f"{_fmt(fig['samples_per_s'], '.1f')} ({_fmt(c['samples_per_s_ratio'], '.2f')}x)",
                ">= 1.0x TRL",
            ),
            (f"{name} start-up s", _fmt(report["runs"][name]["startup_s"], ".1f"), "—"),
            (
                f"{name} memory added (peak GiB)",
                f"{_fmt(fig.get('peak_added_gib'), '.2f')} ({_fmt(c.get('memory_ratio'), '.2f')}x)",
                "—",
            ),
        ]
        for thr in fig["time_to"]:
            r = c[f"time_to_{thr}_ratio"]
            rows.append(
                (
                    f"{name} time to {thr} greedy",
                    f"{_reach(fig, thr)}" + ("" if r is None else f" ({r:.2f}x)"),
                    "< 1.0x TRL" if thr == "0.90" else "—",
                )
            )
        eq = c.get("equal_time")
        if eq:
            rows.append(
                (
                    f"{name} vs TRL greedy at {eq['s']:.0f} s",
                    f"{_fmt(eq['opdplus']['greedy_acc'])} vs {_fmt(eq['trl']['greedy_acc'])}",
                    "—",
                )
            )
    return rows


def print_curves(report: dict) -> None:
    figs = report.get("figures", {})
    if not figs:
        return
    print("\ngreedy accuracy [avg@k] per checkpoint (training seconds)")
    for name, fig in figs.items():
        cells = [
            f"{c['step']}: {_fmt(c.get('greedy_acc'))} [{_fmt(c.get('avg_at_k'))}] "
            f"({c['train_s']:.0f} s)"
            for c in fig["curve"]
        ]
        print(f"  {name:<10} " + " | ".join(cells))


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
