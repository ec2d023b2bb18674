"""Builders that turn the config into the pipeline's parts, and per-step bookkeeping.

Functions here take the config and hand plain values to the parts (docs/architecture.md,
import rules): the parts themselves never see the config object.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from services.config import Config, teacher_entries
from services.versions import step_staleness


def checkpoint_dir(run_dir: Path) -> Path:
    """The run's checkpoint folder as an absolute path (it is handed to the learner ranks,
    whose working directory is not the driver's; services/storage.py)."""
    return Path(run_dir).absolute() / "checkpoints"


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def build_source(cfg: Config):
    from rollout.sources import make_source

    t = cfg.task
    return make_source(
        t.source,
        path=t.path or None,
        seed=cfg.run.seed,
        task=t.name or None,
        max_prompt_chars=t.max_prompt_chars,
        eval_path=t.eval_path or None,
        verifier=t.verifier,
        verifier_pattern=t.verifier_pattern,
        fields=t.fields,
        chat_template_kwargs=t.chat_template_kwargs,
    )


def check_rendering(source, pair, student_tokenizer) -> int:
    """Before any engine starts: the teacher and the student render a sample of the run's
    prompts (the chat source: one row per distinct sequence of roles) to identical token ids,
    and every template accepts them (rollout.prompting.check_same_rendering; UserError naming
    the row and the first differing position otherwise). Returns the number checked."""
    from rollout.prompting import check_same_rendering
    from rollout.sources import sample_problems

    teacher_tokenizer = (
        student_tokenizer if pair.teacher == pair.student else load_tokenizer(pair.teacher)
    )
    samples = [(f"{p.id} ({p.source})", p.prompt) for p in sample_problems(source)]
    return check_same_rendering(samples, teacher_tokenizer, student_tokenizer)


def teacher_dirs(cfg: Config, pair) -> dict[str, Path]:
    """Each teacher's model folder by name (``services.config.teacher_entries``): the one
    implicit teacher is ``pair.teacher``; every [[teachers]] entry is resolved and checked
    against the student's tokenizer (models.checks.check_pair; the error names the entry)."""
    from services.config import IMPLICIT_TEACHER

    if not cfg.teachers:
        return {IMPLICIT_TEACHER: pair.teacher}
    from models.checks import ModelPairError
    from models.pairs import resolve_pair

    out = {}
    for i, t in enumerate(cfg.teachers):
        try:
            out[t.name] = resolve_pair(t.model, cfg.models.student, progress=False).teacher
        except ModelPairError as exc:
            raise ModelPairError(f"teachers[{i}] ({t.name!r}): {exc}") from None
    return out


def check_teachers(cfg: Config, source, pair, student_tokenizer) -> dict[str, Path]:
    """Before any engine starts, for several teachers: every teacher a data row names is
    configured (services.teachers.check_data), each teacher shares the student's tokenizer
    (``teacher_dirs``) and renders the prompts as the student does (``check_rendering``, the
    error naming the entry). Returns ``teacher_dirs``."""
    from models.pairs import ModelPair
    from services.errors import UserError
    from services.teachers import check_data

    dirs = teacher_dirs(cfg, pair)
    if not cfg.teachers:
        return dirs
    check_data(source, list(dirs))
    for i, (name, folder) in enumerate(dirs.items()):
        try:
            check_rendering(
                source, ModelPair(teacher=folder, student=pair.student), student_tokenizer
            )
        except UserError as exc:
            raise type(exc)(f"teachers[{i}] ({name!r}): {exc}") from None
    return dirs


def data_report(cfg: Config, *, n: int = 1000) -> dict:
    """``opdplus data``: what the run's prompt source holds and how each model sees it — row
    counts, prompts skipped and why, token-length percentiles of up to ``n`` training prompts
    and the evaluation set, the rendering check, and one prompt rendered for each model."""
    from models.pairs import resolve_pair
    from rollout.prompting import encode_prompt, render_text
    from services.driver import run_source

    pair = resolve_pair(teacher_entries(cfg)[0].model, cfg.models.student, progress=False)
    student = load_tokenizer(pair.student)
    source = build_source(cfg)
    checked = check_rendering(source, pair, student)  # UserError when they differ
    check_teachers(cfg, source, pair, student)  # [[teachers]]: every one, and the data's names
    counts = dict(getattr(source, "counts", {}))
    limited = run_source(cfg, source, student)
    train = limited.next_batch(n)
    evals = limited.eval_set()

    def percentiles(problems) -> dict:
        lengths = sorted(len(encode_prompt(student, p.prompt)) for p in problems)
        if not lengths:
            return {}
        return {
            f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)]
            for q in (50, 90, 99, 100)
        }

    teacher = student if pair.teacher == pair.student else load_tokenizer(pair.teacher)
    example = (train or evals)[0]
    return {
        "source": cfg.task.source,
        "counts": counts,
        "skipped": {
            "longer_than_max_prompt_chars": counts.get("too_long", limited.skipped),
            f"longer_than_max_model_len_tokens (first {len(train)} training prompts)": (
                limited.skipped_tokens
            ),
            "eval_longer_than_max_model_len_tokens": limited.eval_skipped_tokens,
        },
        "prompt_tokens": {"train": percentiles(train), "eval": percentiles(evals)},
        "rendering_check": f"teacher and student give identical token ids on {checked} prompts",
        "example": {
            "id": example.id,
            "teacher_sees": render_text(teacher, example.prompt),
            "student_sees": render_text(student, example.prompt),
        },
    }


def sync_backend(cfg: Config) -> str:
    from services.nccl_sync import resolve_sync_backend

    return resolve_sync_backend(
        cfg.rollout.sync_backend,
        sampler_gpus=cfg.rollout.sampler_gpus,
        learner_gpus=cfg.learner.gpus_per_rank,
    )


def _engine_weight_transfer(backend: str) -> str:
    """The student engines' ``weight_transfer``: the collective backend, else "none"."""
    from services.nccl_sync import COLLECTIVE

    return backend if backend in COLLECTIVE else "none"


def build_weight_publisher(cfg: Config, learner, rollout):
    from services.weight_publisher import make_weight_publisher

    return make_weight_publisher(
        sync_backend(cfg),
        learner,
        rollout,
        timeout_s=cfg.rollout.sync_timeout_s,
        wire_dtype=cfg.models.dtype,
    )


def engine_settings(
    cfg: Config,
    model_dir: Path,
    *,
    seed: int,
    weight_transfer: str = "none",
    teacher_topk: int | str = 0,
    teacher_temperature: float = 1.0,
    dtype: str = "",
):
    """dtype: the engine's (a [[teachers]] entry's); empty = models.dtype."""
    from rollout.engine import EngineSettings

    r = cfg.rollout
    return EngineSettings(
        model_path=str(model_dir),
        dtype=dtype or cfg.models.dtype,
        seed=seed,
        kv_cache_mb=r.kv_cache_mb,
        kv_cache_fraction=r.kv_cache_fraction,
        max_model_len=r.max_model_len,
        weight_transfer=weight_transfer,
        teacher_topk=teacher_topk,
        teacher_temperature=teacher_temperature,
    )


def build_rollout(cfg: Config, pair):
    from services.control import control_name
    from services.rollout_service import RolloutPlan, RolloutService

    r = cfg.rollout
    plan = RolloutPlan(
        prompts_per_step=r.prompts_per_step,
        samples_per_prompt=r.samples_per_prompt,
        max_tokens=r.max_tokens,
        temperature=r.temperature,
        max_staleness=r.max_staleness,
        channel_capacity=r.channel_capacity,
        sync_timeout_s=r.sync_timeout_s,
        seed=cfg.run.seed,
        max_restarts=r.max_restarts,
        dispatch_groups=r.dispatch_groups,
        call_timeout_s=r.call_timeout_s,
        start_timeout_s=cfg.ray.placement_timeout_s,
        step_timeout_s=r.step_timeout_s,
        episodes=episode_settings(cfg),
    )
    return RolloutService(
        student_settings=engine_settings(
            cfg,
            pair.student,
            seed=cfg.run.seed,
            weight_transfer=_engine_weight_transfer(sync_backend(cfg)),
        ),
        teacher_settings=engine_settings(
            cfg,
            pair.teacher,
            seed=cfg.run.seed,
            teacher_topk=cfg.distill.teacher_topk,
            teacher_temperature=cfg.distill.teacher_temperature,
        ),
        num_samplers=r.num_samplers,
        num_scorers=r.num_scorers,
        sampler_resources=ray_options(r.sampler_cpus, r.sampler_gpus, r.sampler_resources),
        scorer_resources=ray_options(r.scorer_cpus, r.scorer_gpus, r.scorer_resources),
        plan=plan,
        in_process=r.in_process,
        control_name=control_name(cfg.run.name),
        teachers=_teacher_specs(cfg, pair) if cfg.teachers else None,
    )


def _teacher_specs(cfg: Config, pair) -> list:
    """The [[teachers]] entries as ``services.teachers.TeacherSpec`` (engines, scorers)."""
    from services.teachers import TeacherSpec

    dirs = teacher_dirs(cfg, pair)
    return [
        TeacherSpec(
            t.name,
            engine_settings(
                cfg,
                dirs[t.name],
                seed=cfg.run.seed,
                teacher_topk=cfg.distill.teacher_topk,
                teacher_temperature=cfg.distill.teacher_temperature,
                dtype=t.dtype,
            ),
            t.num_scorers,
            ray_options(t.scorer_cpus, t.scorer_gpus, t.scorer_resources),
        )
        for t in teacher_entries(cfg)
    ]


def episode_settings(cfg: Config):
    """``rollout.episodes.EpisodeSettings`` of a run with task.environment set, else None."""
    if not cfg.task.environment:
        return None
    from rollout.environments import EnvironmentOptions
    from rollout.episodes import EpisodeSettings

    return EpisodeSettings(
        environment=cfg.task.environment,
        options=EnvironmentOptions(seed=cfg.run.seed, system=cfg.task.environment_system or None),
        max_turns=cfg.rollout.max_turns,
        max_episode_tokens=cfg.rollout.max_episode_tokens,
    )


def ray_options(cpus: float, gpus: float, custom: dict) -> dict:
    """Ray actor options for one role: CPUs, GPUs and custom resources (e.g. {"rollout": 1}
    to place the role on nodes started with ``ray start --resources '{"rollout": 2}'``)."""
    opts = {"num_cpus": cpus, "num_gpus": gpus}
    if custom:
        opts["resources"] = dict(custom)
    return opts


def learner_settings(cfg: Config, student_dir: Path | None = None):
    """The learner's (OptimSettings, LossSettings): the one place they are built from config.
    student_dir: with learner.lora, its modules resolve the targets (LoraTargetError, before
    any engine starts); None keeps the names as configured."""
    from learner.settings import LossSettings, OptimSettings

    lr, d = cfg.learner, cfg.distill
    optim = OptimSettings(
        zero_stage=lr.zero_stage,
        lr=lr.lr,
        lr_schedule=lr.lr_schedule,
        warmup_steps=lr.warmup_steps,
        total_steps=cfg.run.steps,
        weight_decay=lr.weight_decay,
        betas=(lr.betas[0], lr.betas[1]),
        grad_clip=lr.grad_clip,
        precision=lr.precision,
        seed=cfg.run.seed,
        micro_batch_tokens=lr.micro_batch_tokens,
        lora=_lora_settings(lr.lora, student_dir),
    )
    loss = LossSettings(
        divergence=d.divergence,
        divergence_params=(("alpha", d.alpha),) if d.divergence == "alpha" else (),
        estimator=d.estimator,
        discount=d.discount,
        ratio_clip=d.ratio_clip or None,  # the config's 0 means off
        is_cap=d.is_cap,
        aggregation=d.aggregation,
        center_cost=d.center_cost,
        temperature=cfg.rollout.temperature,
        logprob_chunk=lr.logprob_chunk,
        teacher_head=_teacher_head_settings(cfg),
    )
    return optim, loss


def _teacher_head_settings(cfg: Config):
    """distill.teacher_topk = "full": where the ranks load the teacher's output layer from."""
    if cfg.distill.teacher_topk != "full":
        return None
    from learner.settings import TeacherHeadSettings
    from models.pairs import resolve_pair

    teacher = resolve_pair(cfg.models.teacher, cfg.models.student, progress=False).teacher
    return TeacherHeadSettings(
        teacher_path=str(teacher), teacher_temperature=cfg.distill.teacher_temperature
    )


def _lora_settings(lora, student_dir: Path | None):
    """learner.lora as `LoraSettings` (None at rank 0), targets resolved to full module names."""
    if lora.rank == 0:
        return None
    from learner.lora import student_targets
    from learner.settings import LoraSettings

    targets = lora.target_modules
    return LoraSettings(
        rank=lora.rank,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=tuple(student_targets(student_dir, targets) if student_dir else targets),
    )


def build_learner(cfg: Config, student_dir: Path, *, pad_id: int):
    from services.learner_group import LearnerGroup

    lr = cfg.learner
    optim, loss = learner_settings(cfg, student_dir)
    return LearnerGroup(
        str(student_dir),
        pad_id=pad_id,
        num_ranks=lr.num_ranks,
        rank_options=ray_options(lr.cpus_per_rank, lr.gpus_per_rank, lr.resources),
        num_threads=lr.threads,
        optim=optim,
        loss=loss,
        placement_timeout_s=cfg.ray.placement_timeout_s,
        step_timeout_s=lr.step_timeout_s,
    )


def prompt_only(problems) -> bool:
    """Held-out problems without answers (a prompt-only chat dataset): evaluated against the
    teacher (greedy agreement, reverse KL) instead of a verifier."""
    return bool(problems) and all(p.answer == "" for p in problems)


def check_evaluation(cfg: Config, eval_set) -> None:
    """Before any engine starts: a prompt-only held-out set needs the teacher's greedy answers,
    which a hidden-state scorer (distill.teacher_topk = "full") cannot generate."""
    from services.config import ConfigError

    if cfg.distill.teacher_topk == "full" and prompt_only(eval_set):
        raise ConfigError(
            "distill.teacher_topk: 'full' scores with the teacher's hidden states, which cannot "
            "generate the teacher's greedy answers that evaluating prompt-only held-out data "
            "needs; set distill.teacher_topk to an integer (0 or a top-K) for this dataset"
        )


def evaluate_student(
    rollout, problems, model_dir: Path, cfg: Config, *, sync: bool = False
) -> dict:
    """Greedy accuracy and sampled avg@k of the student as the samplers now serve it; on
    held-out prompts without answers (a prompt-only chat dataset) its greedy agreement with
    the teacher and the reverse KL of its samples, scored by a teacher scorer instead."""
    from rollout.accuracy import evaluate, evaluate_prompt_only
    from services.eval_command import flatten_eval

    if not problems:
        return {"n_problems": 0, "policy_version": rollout.served_version}
    if sync:
        rollout.wait_for_push()
    if prompt_only(problems):
        version = rollout.served_version
        report = evaluate_prompt_only(
            model_dir,
            problems,
            engine=rollout,  # generate: the student as served; score / teacher_greedy: a scorer
            k=cfg.eval.samples,
            max_tokens=cfg.eval.max_tokens,
            seed=cfg.run.seed,
            policy_version=version,
        )
        return flatten_eval(report) | {"policy_version": version}
    report = evaluate(
        model_dir,
        problems,
        engine=rollout,  # RolloutService.generate: a live sampler's current weights
        k=cfg.eval.samples,
        max_tokens=cfg.eval.max_tokens,
        seed=cfg.run.seed,
        episodes=episode_settings(cfg),  # task.environment: episodes, and the tool-call rate
        max_model_len=cfg.rollout.max_model_len,
    )
    result = flatten_eval(report)
    result["policy_version"] = rollout.served_version  # flatten_eval adds the tool-call rates
    if len(cfg.teachers) > 1:  # each teacher's prompts on their own (services/teachers.py)
        from services.teachers import split_by_teacher

        names = [t.name for t in cfg.teachers]
        for name, part in split_by_teacher(problems, names).items():
            if part:
                own = flatten_eval(
                    evaluate(
                        model_dir, part, engine=rollout, k=cfg.eval.samples,
                        max_tokens=cfg.eval.max_tokens, seed=cfg.run.seed,
                    )
                )  # fmt: skip
                result |= {f"teacher/{name}/{k}": own[k] for k in _PER_TEACHER if k in own}
    return result


_PER_TEACHER = ("n_problems", "greedy_acc", "avg_at_k")  # evaluation keys kept per teacher


def teacher_metrics(batch) -> dict:
    """Several teachers: per teacher (the ledger's teachers column), its share of the step's
    samples and the sampled reverse KL of its samples, the per-token Monte-Carlo estimate of
    KL(π_S ‖ π_T) = mean over its response tokens of log π_sampler(y_t) − log π_T(y_t)
    (at rollout.temperature; can come out below 0). {} with one implicit teacher."""
    per: dict[str, list] = {}
    for s, p in zip(batch.samples, batch.provenance, strict=True):
        if p.teacher:
            per.setdefault(p.teacher, []).append(s)
    row = {}
    for name, samples in sorted(per.items()):
        diffs = [
            ls - lt
            for s in samples
            for ls, lt in zip(s.rollout.logp_sampler, s.logp_teacher, strict=True)
        ]
        row[f"teacher/{name}/samples"] = len(samples)
        row[f"teacher/{name}/reverse_kl"] = statistics.fmean(diffs) if diffs else 0.0
    return row


def step_metrics(batch, stats: dict, times, spans: dict[str, float]) -> dict:
    """The per-step row: learner/distill stats from the learner, rollout/time/perf here, and
    for episodes (task.environment) ``rollout.episodes.episode_metrics``.

    batch: the step's ``services.channel.Batch``; spans: the driver's StepClock spans (wait
    for the batch, train, sync, whole step).
    """
    from rollout.episodes import episode_metrics

    stale = [step_staleness(batch.step, s.policy_version) for s in batch]
    tokens = sum(len(s.rollout.response_ids) for s in batch)
    row = dict(stats) | teacher_metrics(batch)
    row.update(
        {
            "rollout/staleness": stale,
            "rollout/staleness_mean": statistics.fmean(stale),
            "rollout/staleness_max": max(stale),
            "rollout/response_len_mean": tokens / len(batch),
            "rollout/truncated_frac": sum(s.rollout.finish_reason == "length" for s in batch)
            / len(batch),
            "time/wall": time.time(),
            "rollout/producer_wait": times.producer_wait,
            "rollout/timed_samples": times.samples,
            "time/sample": times.sample,
            "time/score": times.score,
            "time/train": spans["train"],
            "time/sync": spans["sync"],
            "time/wait": spans["wait"],
            "time/step": spans["step"],
            "perf/tokens_per_s": tokens / spans["step"],
            "perf/samples_per_s": len(batch) / spans["step"],
        }
    )
    row.update(episode_metrics([s.rollout for s in batch]))  # episode/...: issue 22
    return row
