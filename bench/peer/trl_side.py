"""TRL's side of the race: its ``DistillationTrainer`` on the prompts opdplus draws, its CPU
settings, torch threads and training clock (checkpoint saves taken out)."""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import os
import sys
import time
from pathlib import Path

from peer import BenchError

TRL_VERSION = "1.16.0"
INSTALL_HINT = "pip install -e .[bench] -c constraints.txt"
# TRL's generalized JSD interpolates forward KL (beta 0), JS (0.5) and reverse KL (1).
TRL_BETA = {"forward_kl": 0.0, "js": 0.5, "reverse_kl": 1.0}


def require_trl() -> str:
    """TRL's version, or a one-line error with the install command (checked before any run)."""
    if importlib.util.find_spec("trl") is None:
        raise BenchError(f"TRL is not installed; install the bench extra: {INSTALL_HINT}")
    version = importlib.metadata.version("trl")
    if version != TRL_VERSION:
        print(f"peer_trl: TRL {version} installed, the bench pins {TRL_VERSION}", file=sys.stderr)
    return version


def trl_beta(args: argparse.Namespace, divergence: str) -> float:
    if args.trl_beta is not None:
        return args.trl_beta
    if divergence not in TRL_BETA:
        raise BenchError(
            f"TRL's generalized JSD has no {divergence!r}; pass --trl-beta (0 forward KL, "
            "0.5 JS, 1 reverse KL)"
        )
    return TRL_BETA[divergence]


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
