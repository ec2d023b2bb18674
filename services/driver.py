"""The training loop: prompts → samplers → scorers → learner → weight sync → log.

``train`` reads as the pipeline; the parts live in rollout/, learner/ and services/.
Rollout for step k+1 overlaps training on step k, bounded by ``rollout.max_staleness``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.config import Config, teacher_entries
from services.errors import UserError
from services.run_dir import check_resume, prepare_run_dir
from services.versions import published_after, trained_at


class RunError(UserError, RuntimeError):
    """A run cannot start or continue; the message says what to do."""


class RunStopped(RunError):
    """A run stopped before its last step (a worker kept failing, a learner rank died,
    Ctrl-C); the message names the cause, where the checkpoints are and how to resume."""


@dataclass(frozen=True)
class RunSummary:
    run_dir: str
    steps: int
    wall_s: float
    eval_before: dict | None
    eval_after: dict | None
    divergence_first: float | None
    divergence_last: float | None
    plots: list[str]
    # Several teachers: each one's part of the held-out gain (services.teachers.improvement).
    teachers: dict | None = None


@dataclass(frozen=True)
class CheckpointDone:
    """A checkpoint was written: after ``step``, in ``seconds``; ``learner`` is the learner
    group (``save_hf``, ``export_weights``) for tools that export more at that point."""

    step: int
    run_dir: Path
    seconds: float
    learner: Any


@dataclass(frozen=True)
class RunHooks:
    """Callbacks on the driver thread, for tests and tools that observe a run by its events
    instead of polling its files. A hook that raises stops the run like any error there
    (KeyboardInterrupt: a clean stop with the resume command, as Ctrl-C)."""

    on_step: Callable[[int, dict], None] | None = None  # (step, its metrics row), once logged
    on_checkpoint: Callable[[CheckpointDone], None] | None = None


def train(
    cfg: Config,
    *,
    resume: bool = False,
    progress: bool | None = None,
    stop_after_step: int | None = None,
    hooks: RunHooks | None = None,
) -> RunSummary:
    """Run (or resume) training. ``stop_after_step``: stop as Ctrl-C would once that step is
    logged and checkpointed (tests and tooling); raises RunStopped. ``hooks``: RunHooks.
    The run directory stays locked (services/run_dir.py) until the run has ended."""
    from services import storage

    # One absolute run path for every process of the run (and in the stored config.toml).
    cfg = storage.absolute_out_dir(cfg)
    run_dir, run_lock = prepare_run_dir(cfg, resume=resume)
    with run_lock:
        storage.prepare(run_dir, uri=cfg.run.storage, name=cfg.run.name)  # marker; says where
        return _train(
            cfg, run_dir, resume=resume, progress=progress, stop_after_step=stop_after_step,
            hooks=hooks,
        )  # fmt: skip


def _train(
    cfg: Config,
    run_dir: Path,
    *,
    resume: bool,
    progress: bool | None,
    stop_after_step: int | None,
    hooks: RunHooks | None,
) -> RunSummary:
    from models.pairs import resolve_pair
    from rollout.sources import skipped_metrics
    from services.cluster import Stops, ray_session, run_namespace
    from services.console import adopt_run_dir, say
    from services.eval_command import held_out_prompts
    from services.ledger import ledger_row
    from services.parts import (
        build_learner,
        build_rollout,
        build_source,
        build_weight_publisher,
        check_evaluation,
        check_rendering,
        check_teachers,
        checkpoint_dir,
        evaluate_student,
        load_tokenizer,
        step_metrics,
    )
    from services.placement import preflight
    from services.progress import Progress
    from services.storage import for_run

    hooks = hooks or RunHooks()
    t_start = time.perf_counter()
    adopt_run_dir(run_dir)  # quiet console: engine/library output → run_dir/engine.log
    show = cfg.log.progress if progress is None else progress
    # The first teacher ([[teachers]]' first entry, else models.teacher) is the pair's.
    pair = resolve_pair(teacher_entries(cfg)[0].model, cfg.models.student, progress=show)
    tokenizer = load_tokenizer(pair.student)
    # Everything started below is stopped by ``stops``, last started first, each stop even when
    # an earlier one raises or the start-up itself fails (services.cluster.Stops).
    with (
        ray_session(
            address=cfg.ray.address,
            num_cpus=cfg.ray.num_cpus,
            dashboard=cfg.ray.dashboard,
            namespace=run_namespace(cfg.run.name),
            record=run_dir,  # ray-session.json: a later --resume warns if it is still up
        ) as ray_info,
        Stops(report=say) as stops,
    ):
        if ray_info.dashboard_url:
            say(f"[opdplus] Ray dashboard: {ray_info.dashboard_url}")
        preflight(cfg)  # a resource no node offers: an error now, before anything starts
        source = run_source(cfg, build_source(cfg), tokenizer)  # + the token-length filter
        check_rendering(source, pair, tokenizer)  # teacher and student see the same token ids
        check_teachers(cfg, source, pair, tokenizer)  # [[teachers]]: named, tokenizers, rendering
        eval_set = (source.eval_set() or held_out_prompts(source))[: cfg.task.eval_size]
        check_evaluation(cfg, eval_set)  # what the evaluation needs, the scorers can give
        # The learner ranks load (a Ray thread) while the engines start here: two waits at once.
        learner_started = stops.start_beside(
            "the learner ranks",
            lambda: build_learner(cfg, pair.student, pad_id=tokenizer.pad_token_id or 0),
            "shutdown",
        )
        rollout = stops.add("the rollout tier", build_rollout(cfg, pair), "stop")
        learner = learner_started()
        # Every rank must see run_dir (reads the driver's marker) or run.storage be usable.
        learner.attach_storage(for_run(run_dir, uri=cfg.run.storage, name=cfg.run.name))
        weight_publisher = stops.add(
            "the weight publisher", build_weight_publisher(cfg, learner, rollout), "close"
        )
        first_step, state = 1, None
        if resume:
            state = learner.load_checkpoint(checkpoint_dir(run_dir))
            if "config" in state:  # the config the checkpoint was trained with
                check_resume(state["config"], cfg, where=checkpoint_dir(run_dir))
            first_step = state["step"] + 1
            source.restore(state["source_state"])
            # The version the checkpointed weights are, as saved (not re-derived).
            weight_publisher.publish(state["policy_version"], wait=True)
        metrics = stops.add(
            "the metrics writers",
            open_metrics(cfg, run_dir, resume_from_step=first_step - 1 if resume else None),
            "close",
        )
        # No held-out answers (a prompt-only chat dataset): the student against the teacher.
        eval_before = (
            state["eval_before"]
            if state
            else evaluate_student(rollout, eval_set, pair.student, cfg)
        )
        if not resume:
            metrics.log(
                0, {f"eval/{k}": v for k, v in eval_before.items() if isinstance(v, (int, float))}
            )
        rollout.start(
            source, tokenizer_encode(tokenizer), first_step=first_step, last_step=cfg.run.steps
        )
        bar = stops.add(
            "the progress bar",
            Progress(total=cfg.run.steps, initial=first_step - 1, enabled=show, desc="OPD+ train"),
            "close",
        )
        step = first_step - 1
        try:
            for step in range(first_step, cfg.run.steps + 1):
                clock = StepClock()
                # sample + score (overlapped); a collective publisher brings a replaced or
                # added sampler into its group meanwhile (services/weight_publisher.py)
                batch = weight_publisher.next_batch(rollout, step, trained=trained_at(step))
                clock.mark("wait")
                stats = learner.train_step(batch.samples, step=step)  # train (stops on NaN/Inf)
                clock.mark("train")
                if step % cfg.learner.sync_every == 0 or step == cfg.run.steps:
                    weight_publisher.publish(published_after(step))  # push weights
                clock.mark("sync")
                row = step_metrics(batch, stats, rollout.take_times(), clock.spans)
                row |= rollout.worker_metrics() | skipped_metrics(batch.source_state)
                row |= weight_publisher.metrics()  # the collective group's size, its re-forms
                if cfg.eval.every and step % cfg.eval.every == 0 and step != cfg.run.steps:
                    row |= eval_metrics(
                        evaluate_student(rollout, eval_set, pair.student, cfg, sync=True)
                    )
                metrics.log(step, row, ledger=ledger_row(batch))  # log
                bar.update(row)
                if hooks.on_step is not None:
                    hooks.on_step(step, row)
                if step % cfg.run.checkpoint_every == 0 or step == cfg.run.steps:
                    t0 = time.perf_counter()
                    checkpoint(learner, run_dir, batch, eval_before, keep=cfg.run.keep_checkpoints)
                    if hooks.on_checkpoint is not None:
                        hooks.on_checkpoint(
                            CheckpointDone(step, run_dir, time.perf_counter() - t0, learner)
                        )
                if step == stop_after_step:
                    raise KeyboardInterrupt
            eval_after = evaluate_student(rollout, eval_set, pair.student, cfg, sync=True)
            metrics.log(cfg.run.steps, eval_metrics(eval_after))
            learner.save_hf(run_dir / "student")
        except BaseException as exc:
            reason = stop_reason(exc)
            if reason is None:
                raise
            raise RunStopped(stop_message(reason, run_dir, step)) from None
    return finish_run(run_dir, cfg, eval_before, eval_after, time.perf_counter() - t_start)


# ----------------------------------------------------------------------------- helpers


def stop_reason(exc: BaseException) -> str | None:
    """Why a run stopped, for the user, when it is a failure they can resume from; None for
    anything else (a bug keeps its traceback)."""
    from rollout.sources import SourceError
    from services.calls import LearnerTimeout, is_worker_death
    from services.channel import RolloutError
    from services.pool import short_error

    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted ({exc})" if str(exc) else "interrupted"  # (SIGTERM): services.cli
    if isinstance(exc, LearnerTimeout):
        return f"a learner rank hung: {exc}"
    if isinstance(exc, RolloutError):
        cause = exc.__cause__ or exc
        if isinstance(cause, SourceError):
            return None  # bad data: resuming would replay it; its message says what to fix
        return f"the rollout tier failed: {cause}"
    if is_worker_death(exc):
        return f"a learner rank died: {short_error(exc)}"
    return None


def stop_message(reason: str, run_dir: Path, step: int) -> str:
    """One message: what happened, which checkpoint is kept, the exact command to resume."""
    import os

    from services.parts import checkpoint_dir

    latest = checkpoint_dir(run_dir) / "latest"
    kept = latest.read_text().strip() if latest.exists() else None
    config = (run_dir / "config.toml").resolve()
    where = "" if run_dir.is_absolute() else f" (from {os.getcwd()})"
    if kept is None:
        return (
            f"run stopped during step {step}: {reason}. No checkpoint was written yet; "
            f"start again with: opdplus train --config {config}{where}"
        )
    return (
        f"run stopped during step {step}: {reason}. Checkpoints are kept in "
        f"{checkpoint_dir(run_dir)} (latest: {kept}); resume with:\n"
        f"  opdplus train --config {config} --resume{where}"
    )


class StepClock:
    """Seconds between marks within one step: spans["wait"], ["train"], ["sync"], ["step"]."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.spans: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.spans[name] = now - self.last
        self.spans["step"] = now - self.start
        self.last = now


def checkpoint(learner, run_dir: Path, batch, eval_before: dict, *, keep: int) -> None:
    """Learner weights + optimizer (DeepSpeed), and what resuming needs: the step, the policy
    version, and the prompt source's position after the step's ``batch`` was drawn."""
    from services.parts import checkpoint_dir

    state = {
        "step": batch.step,
        "policy_version": published_after(batch.step),
        "eval_before": eval_before,
        "source_state": batch.source_state,
        "config": (run_dir / "config.toml").read_text(),  # for --resume's compatibility check
    }
    learner.save_checkpoint(checkpoint_dir(run_dir), state, keep=keep)


def open_metrics(cfg: Config, run_dir: Path, *, resume_from_step: int | None):
    from services.metrics import MetricsLogger

    return MetricsLogger(
        run_dir,
        tensorboard=cfg.log.tensorboard,
        wandb=cfg.log.wandb,
        wandb_project=cfg.log.wandb_project,
        run_name=cfg.run.name,
        config=asdict(cfg),
        resume_from_step=resume_from_step,
    )


def run_source(cfg: Config, source, tokenizer):
    """The run's prompt source as the samplers see it: ``source`` (``build_source(cfg)``)
    without the prompts too long in tokens for the engines (rollout.sources.TokenLimitedSource;
    the ledger's replay builds it the same way). With task.environment a prompt is counted as
    an episode starts from (``EpisodeSettings.prompt``: task.environment_system's message, then
    the problem) and keeps room for a whole episode (rollout.max_episode_tokens), so a long
    system message never silently shortens episodes."""
    from rollout.sources import TokenLimitedSource
    from services.parts import episode_settings

    r = cfg.rollout
    encode = tokenizer_encode(tokenizer)
    response, eval_response = r.max_tokens, cfg.eval.max_tokens
    episodes = episode_settings(cfg)
    if episodes is not None:
        encode = episode_encode(encode, episodes)
        response = eval_response = r.max_episode_tokens  # an episode's tokens after its prompt
        if r.max_model_len - response - 1 < 1:
            from services.config import ConfigError

            raise ConfigError(
                f"rollout.max_episode_tokens ({r.max_episode_tokens}) leaves no room for a "
                f"prompt in rollout.max_model_len ({r.max_model_len}): need "
                "max_episode_tokens + the prompt (with task.environment_system) + 1 <= "
                "max_model_len"
            )
    # The engines take a sequence while its length + 1 fits max_model_len (the scorer scores
    # prompt + response and reads one position more; rollout/engine.py::_check_lengths).
    return TokenLimitedSource(
        source,
        encode,
        max_prompt_tokens=r.max_model_len - response - 1,
        max_eval_tokens=r.max_model_len - eval_response - 1,
    )


def episode_encode(encode, episodes):
    """``encode`` of the prompt an episode on a problem with this prompt starts from
    (``EpisodeSettings.prompt``, as the producer encodes it): what the length filter counts."""
    from rollout.sources import Problem

    def encode_episode(prompt) -> list[int]:
        return encode(episodes.prompt(Problem("", prompt, "", "", "")))

    return encode_episode


def tokenizer_encode(tokenizer):
    from rollout.prompting import encode_prompt

    def encode(text: str) -> list[int]:
        return encode_prompt(tokenizer, text)

    return encode


def eval_metrics(result: dict) -> dict:
    return {f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))}


def finish_run(run_dir: Path, cfg: Config, before: dict, after: dict, wall_s: float) -> RunSummary:
    from services.console import say
    from services.eval_command import prompt_only_lines
    from services.metrics import read_metrics, write_plots
    from services.teachers import improvement, improvement_lines

    rows = read_metrics(run_dir / "metrics.jsonl")
    div = [r["distill/divergence"] for r in rows if r.get("distill/divergence") is not None]
    plots = [str(p) for p in write_plots(run_dir)] if cfg.log.plots else []
    summary = RunSummary(
        run_dir=str(run_dir),
        steps=cfg.run.steps,
        wall_s=wall_s,
        eval_before=before,
        eval_after=after,
        # Means over the first/last few steps: one step's estimate is noisy.
        divergence_first=statistics.fmean(div[:5]) if div else None,
        divergence_last=statistics.fmean(div[-5:]) if div else None,
        plots=plots,
        teachers=improvement(before, after, [t.name for t in cfg.teachers]) or None,
    )
    (run_dir / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    for line in prompt_only_lines(before, after) + improvement_lines(summary.teachers or {}):
        say(line)
    return summary
