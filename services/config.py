"""One typed config tree for a run, loaded from TOML with ``--set a.b=c`` overrides.

Every field has a one-line doc (the ``doc`` metadata) that ``opdplus config`` prints.
Validation happens once at start-up and raises ``ConfigError`` with the key, what was
expected and, for an unknown key, the nearest valid one. Imports only the standard library
(the CLI parses config before importing torch, ray or vllm).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from services.errors import UserError


class ConfigError(UserError, ValueError):
    """A run config is invalid; the message names the key and what was expected."""


SyncBackend = Literal["auto", "object_store", "nccl", "gloo"]
SYNC_BACKENDS: tuple[str, ...] = typing.get_args(SyncBackend)


def nccl_fits(sampler_gpus: float, learner_gpus: float) -> bool:
    """NCCL allows one rank per device, so its weight sync needs whole GPUs on every sampler
    and learner rank (a fraction lets Ray put two ranks on one GPU, which NCCL refuses)."""
    return sampler_gpus >= 1 and learner_gpus >= 1


def _f(default: Any, doc: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("run", "run name; the run directory is <out_dir>/<name>")
    out_dir: str = _f("runs", "parent folder of run directories")
    seed: int = _f(0, "seed for prompts, sampling and initialisation")
    steps: int = _f(100, "number of learner steps (optimizer updates)")
    checkpoint_every: int = _f(25, "save a checkpoint every N steps (and at the end)")
    keep_checkpoints: int = _f(
        2, "how many recent verified checkpoints to keep (>= 2: a resume falls back past one)"
    )
    storage: str = _f(
        "",
        "URI (pyarrow.fs: s3://, gs://, hdfs://, file://) that checkpoints and the final student "
        "are copied to, for clusters whose nodes do not share run.out_dir; empty = none",
    )


@dataclass(frozen=True)
class ModelsConfig:
    teacher: str = _f("toy", "teacher model folder, or 'toy' / 'smollm2' for the built-in pairs")
    student: str = _f("toy", "student model folder, or 'toy' / 'smollm2' for the built-in pairs")
    dtype: Literal["float32", "bfloat16"] = _f("float32", "vLLM engine dtype")


@dataclass(frozen=True)
class TeacherConfig:
    name: str = _f(
        "",
        "the teacher's name: data rows name their teacher by it (their `teacher` field); "
        "the ledger's teachers column and the teacher/<name>/... metrics use it",
    )
    model: str = _f("", "model folder, or 'toy' / 'smollm2' (the built-in pairs' teacher)")
    dtype: str = _f("", "its engines' dtype, float32 or bfloat16; empty = models.dtype")
    num_scorers: int = _f(1, "scorer actors of this teacher (each runs one vLLM engine)")
    scorer_cpus: float = _f(-1.0, "CPUs per scorer actor; negative = rollout.scorer_cpus")
    scorer_gpus: float = _f(-1.0, "GPUs per scorer actor; negative = rollout.scorer_gpus")
    scorer_resources: dict = _f(
        {}, "Ray custom resources per scorer actor; empty = rollout.scorer_resources"
    )


IMPLICIT_TEACHER = "teacher"  # the name of models.teacher when no [[teachers]] are given


@dataclass(frozen=True)
class TaskConfig:
    source: str = _f(
        "arithmetic", "prompt source, a kind registered in rollout.sources.SOURCES: {sources}"
    )
    path: str = _f(
        "",
        "JSONL file of {prompt, answer} records (source = 'jsonl'); source = 'chat': a JSONL or "
        "Parquet file or a datasets save_to_disk folder of messages/prompt rows",
    )
    name: str = _f(
        "", "reasoning-gym task name, e.g. 'basic_arithmetic' (source = 'reasoning_gym')"
    )
    max_prompt_chars: int = _f(512, "prompts longer than this are skipped and counted")
    eval_size: int = _f(200, "held-out problems used by evaluation")
    eval_path: str = _f(
        "", "held-out file/folder (source = 'jsonl' or 'chat'); empty = a seeded 10 % hold-out"
    )
    fields: dict[str, str] = _f(
        {},
        'chat source: your column names, e.g. {messages = "conversation", prompt = '
        '"question", answer = "solution", id = "uid"}; unnamed keys use their own name',
    )
    verifier: str = _f(
        "",
        "how answers are scored, a verifier in rollout.verifiers: {verifiers}; empty = the source's own",
    )
    verifier_pattern: str = _f(
        "", "verifier = 'regex': the answer is the first group of this pattern's last match"
    )
    chat_template_kwargs: dict[str, Any] = _f(
        {},
        "chat source: passed to every model's chat template, e.g. {enable_thinking = false}",
    )
    environment: str = _f(
        "",
        "an environment the student calls between its turns (episodes), a kind in "
        "rollout.environments: {environments}; empty = single-turn responses",
    )
    environment_system: str = _f(
        "", "task.environment set: a system message before each problem (e.g. how to call the tool)"
    )


@dataclass(frozen=True)
class RolloutConfig:
    num_samplers: int = _f(1, "student sampler actors (each runs one vLLM engine)")
    num_scorers: int = _f(1, "teacher scorer actors (each runs one vLLM engine)")
    sampler_cpus: float = _f(0.5, "CPUs reserved per sampler actor")
    scorer_cpus: float = _f(0.5, "CPUs reserved per scorer actor")
    sampler_gpus: float = _f(0.0, "GPUs per sampler actor (fractions allowed)")
    scorer_gpus: float = _f(0.0, "GPUs per scorer actor (fractions allowed)")
    sampler_resources: dict = _f(
        {}, "Ray custom resources per sampler actor, e.g. {rollout = 1} (places it on such nodes)"
    )
    scorer_resources: dict = _f({}, "Ray custom resources per scorer actor, e.g. {rollout = 1}")
    prompts_per_step: int = _f(16, "distinct prompts per learner step")
    samples_per_prompt: int = _f(4, "samples drawn per prompt")
    max_tokens: int = _f(48, "maximum response tokens per sample (per student turn in an episode)")
    max_turns: int = _f(4, "task.environment set: student turns per episode")
    max_episode_tokens: int = _f(
        128, "task.environment set: tokens after the prompt per episode, student's and tool's"
    )
    temperature: float = _f(
        1.0, "sampling temperature τ: the student policy is softmax(logits / τ), learner included"
    )
    max_staleness: int = _f(
        1, "samplers run at most this many policy versions ahead; 0 = strictly on-policy"
    )
    channel_capacity: int = _f(
        256, "scored samples buffered between scorers and learner (backpressure)"
    )
    kv_cache_mb: int = _f(256, "KV-cache size per engine on CPU, in MiB")
    kv_cache_fraction: float = _f(
        0.3, "fraction of GPU memory per engine for weights + KV cache (GPU only)"
    )
    max_model_len: int = _f(256, "longest prompt+response the engines accept")
    sync_timeout_s: float = _f(
        120.0, "a sampler whose weight load takes longer counts as hung (killed and replaced)"
    )
    call_timeout_s: float = _f(
        600.0,
        "a sampler that finishes no prompt group, or a scorer or evaluation call that does not "
        "answer, for this long counts as hung: killed, replaced, its work handed out again",
    )
    step_timeout_s: float = _f(
        3600.0,
        "step watchdog: the run stops (with the resume command) when a step's samples "
        "take longer than this to arrive",
    )
    sync_backend: SyncBackend = _f(
        "auto",
        "weight-sync path; auto = nccl on GPU, object store on CPU; gloo = the nccl path "
        "(collective broadcast from learner rank 0) over gloo, on CPU; under nccl and gloo a "
        "restarted or added sampler joins a re-formed group at the next push",
    )
    max_restarts: int = _f(
        3, "times a dead sampler or scorer is replaced (per worker) before the run stops"
    )
    dispatch_groups: int = _f(
        0,
        "prompt groups a free sampler takes at once; 0 = auto (its share of the step in "
        "proportion to its measured speed among the ready samplers)",
    )
    in_process: bool = _f(
        False, "run samplers and scorers as plain objects in the driver (debugging; no restarts)"
    )


@dataclass(frozen=True)
class DistillConfig:
    divergence: str = _f(
        "reverse_kl", "f-divergence to the teacher, a name in learner.divergences: {divergences}"
    )
    alpha: float = _f(0.5, "Amari alpha (divergence = 'alpha' only)")
    estimator: Literal["opd_plus", "opd"] = _f(
        "opd_plus", "immediate cost: f'(r) (opd_plus) or f(r)/r (opd)"
    )
    discount: float = _f(0.0, "discount on future costs, 0 = per-token, 1 = sequence objective")
    ratio_clip: float = _f(
        10.0, "clamp ell = log π_s − log π_T to ±ratio_clip before any exp (0 = off)"
    )
    is_cap: float = _f(
        2.0, "truncate importance weights exp(logp_learner − logp_sampler) at this value"
    )
    aggregation: Literal["token_mean", "seq_mean"] = _f("token_mean", "loss aggregation")
    center_cost: bool = _f(
        True,
        "OPD+: subtract the constant f'(1) from the immediate cost (same expected gradient, lower variance)",
    )
    teacher_temperature: float = _f(
        1.0, "temperature τ_T the teacher is scored at: log softmax(teacher logits / τ_T)"
    )
    teacher_topk: int | Literal["full"] = _f(
        0,
        "K > 0: dense OPD+ over the teacher's top-K tokens at every position (learner/dense.py); "
        '"full": dense OPD+ over the full vocabulary, the exact per-position divergence (the '
        "scorers return the teacher's hidden states, the learner applies its output layer; "
        "learner/teacher_head.py); 0 = sampled-token OPD+",
    )


@dataclass(frozen=True)
class LoraConfig:
    rank: int = _f(
        0,
        "LoRA rank r > 0: train only low-rank adapters W + (alpha / r)·B·A of the student "
        "(peft); the samplers receive the merged weights; 0 = full fine-tuning",
    )
    alpha: float = _f(16.0, "LoRA scale numerator: the adapters' product is scaled by alpha / rank")
    dropout: float = _f(
        0.0,
        "dropout on the adapters' input while training (> 0: the learner's log-probs are no "
        "longer the samplers')",
    )
    target_modules: list[str] = _f(
        [],
        'student modules that get adapters, by name or name suffix, e.g. ["q_proj", "v_proj"]; '
        "empty = every linear layer but the output layer",
    )


@dataclass(frozen=True)
class LearnerConfig:
    num_ranks: int = _f(1, "data-parallel learner ranks (Ray actors, one DeepSpeed rank each)")
    cpus_per_rank: float = _f(1.0, "CPUs reserved per learner rank")
    threads: int = _f(
        0,
        "torch threads per learner rank; 0 = its reserved CPUs (at least 1). More than reserved "
        "lets the learner use cores the engines leave idle while it trains",
    )
    gpus_per_rank: float = _f(0.0, "GPUs per learner rank")
    resources: dict = _f({}, "Ray custom resources per learner rank, e.g. {learner = 1}")
    step_timeout_s: float = _f(
        3600.0, "a learner rank that takes longer for one call stops the run (resume command)"
    )
    zero_stage: int = _f(1, "DeepSpeed ZeRO stage (0, 1, 2 or 3)")
    lr: float = _f(1e-3, "peak AdamW learning rate")
    lr_schedule: Literal["constant", "cosine"] = _f(
        "constant", "learning-rate schedule after warm-up"
    )
    warmup_steps: int = _f(0, "linear warm-up steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list = _f([0.9, 0.99], "AdamW betas")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 = off)")
    precision: Literal["auto", "bf16", "fp32"] = _f(
        "auto", "training precision; auto = bf16 on GPUs that support it, else fp32"
    )
    sync_every: int = _f(1, "push weights to the samplers every N learner steps")
    micro_batch_tokens: int = _f(
        0,
        "token budget (rows × padded length) per learner micro-batch; gradients accumulate "
        "into one optimizer step; 0 = each rank's whole shard at once",
    )
    logprob_chunk: int = _f(
        512,
        "positions per output-layer chunk of the learner's log-probs (memory ∝ chunk × vocab); "
        "0 = the full [B, T, V] logits",
    )
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass(frozen=True)
class EvalConfig:
    every: int = _f(0, "evaluate the student every N steps during training (0 = before/after only)")
    samples: int = _f(4, "k for the sampled avg@k accuracy")
    max_tokens: int = _f(48, "maximum tokens per evaluation completion")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = _f(True, "write TensorBoard event files to the run directory")
    wandb: bool = _f(False, "log to Weights & Biases (offline unless WANDB_MODE says otherwise)")
    wandb_project: str = _f("opdplus", "wandb project name")
    plots: bool = _f(True, "write PNG plots of divergence, loss and accuracy at the end")
    progress: bool = _f(True, "show a progress bar with the live key figures")


@dataclass(frozen=True)
class RayConfig:
    address: str = _f("", "Ray cluster address; empty = start a local instance")
    num_cpus: int = _f(0, "CPUs for a local Ray instance (0 = all)")
    dashboard: bool = _f(True, "start the Ray dashboard (local instance, on 127.0.0.1)")
    placement_timeout_s: float = _f(
        900.0,
        "an actor not placed and started (engines loaded) within this fails the run naming the "
        "resources it asked for; one no node could ever hold fails at once",
    )


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    teachers: list[TeacherConfig] = _f(
        [],
        "[[teachers]] tables, several teachers for one student: each scores the prompts whose "
        "data row names it (the `teacher` field of a jsonl/chat row; rows without one go to the "
        "first entry); keys name, model, dtype, num_scorers, scorer_cpus, scorer_gpus, "
        "scorer_resources (TeacherConfig); empty = the one teacher models.teacher with "
        "rollout.num_scorers scorers",
    )


def teacher_entries(cfg: Config) -> list[TeacherConfig]:
    """The run's teachers with every inherited value filled in: the [[teachers]] entries
    (dtype, CPUs, GPUs, resources from models.* / rollout.* where left unset), or the one
    implicit teacher ``IMPLICIT_TEACHER`` = models.teacher with rollout.num_scorers scorers."""
    r = cfg.rollout
    if not cfg.teachers:
        return [
            TeacherConfig(
                name=IMPLICIT_TEACHER,
                model=cfg.models.teacher,
                dtype=cfg.models.dtype,
                num_scorers=r.num_scorers,
                scorer_cpus=r.scorer_cpus,
                scorer_gpus=r.scorer_gpus,
                scorer_resources=dict(r.scorer_resources),
            )
        ]
    return [
        dataclasses.replace(
            t,
            dtype=t.dtype or cfg.models.dtype,
            scorer_cpus=r.scorer_cpus if t.scorer_cpus < 0 else t.scorer_cpus,
            scorer_gpus=r.scorer_gpus if t.scorer_gpus < 0 else t.scorer_gpus,
            scorer_resources=dict(t.scorer_resources or r.scorer_resources),
        )
        for t in cfg.teachers
    ]


# ----------------------------------------------------------------------------- loading


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(options)}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # int | Literal["full"]: the first arm that takes the value
        arms = typing.get_args(annotation)
        for arm in arms:
            try:
                return _coerce(value, arm, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {' or '.join(map(_expected, arms))}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is dict:  # dict[str, str] (names) or dict[str, Any] (template options)
        value_type = typing.get_args(annotation)[1]
        if not isinstance(value, dict) or not all(
            value_type is Any or isinstance(v, value_type) for v in value.values()
        ):
            kind = "strings" if value_type is str else "values"
            raise ConfigError(f"{where}: expected a table of {kind}, got {value!r}")
        return dict(value)
    if annotation is dict:
        if not isinstance(value, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for v in value.values()
        ):
            raise ConfigError(f"{where}: expected a table of resource amounts >= 0, got {value!r}")
        if {"CPU", "GPU"} & set(value):
            raise ConfigError(f"{where}: CPU/GPU are set by the *_cpus / *_gpus keys, not here")
        return {str(k): float(v) for k, v in value.items()}
    if annotation is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return list(value)
    raise ConfigError(f"{where}: unsupported type {annotation}")  # a bug in this module


def _expected(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " or ".join(map(repr, typing.get_args(annotation)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        annotation, str(annotation)
    )


def schema_hints(cls: type | None = None, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the config schema (``section.key``, in schema order) → its type."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls or Config)
    for f in dataclasses.fields(cls or Config):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out |= schema_hints(hint, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = hint
    return out


def _build(cls: type, data: dict, prefix: str, source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{source}: {prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key{_suggest(key, sorted(fields))}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a [{prefix}{key}] table, got {value!r}")
            kwargs[key] = _build(hint, value, f"{prefix}{key}.", source)
        elif _table_list(hint):  # [[teachers]]: an array of tables
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{where}: expected [[{prefix}{key}]] tables, got {value!r}")
            item = typing.get_args(hint)[0]
            kwargs[key] = [
                _build(item, v, f"{prefix}{key}[{i}].", source) for i, v in enumerate(value)
            ]
        else:
            kwargs[key] = _coerce(value, hint, where)
    return cls(**kwargs)


def _table_list(hint: Any) -> bool:
    """Whether a field is an array of tables (``list[SomeConfig]``)."""
    args = typing.get_args(hint)
    return typing.get_origin(hint) is list and bool(args) and dataclasses.is_dataclass(args[0])


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. distill.divergence=js")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as js or opd_plus is a string
    return key.strip().split("."), value


def _merge(base: dict, path: list[str], value: Any) -> None:
    node = base
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part} is not a table")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Load a TOML run config, apply ``key=value`` overrides, and validate."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for text in overrides:
        keys, value = _parse_override(text)
        _merge(data, keys, value)
    if overrides:
        source += " (with --set)"
    cfg = _build(Config, data, "", source)
    validate(cfg, source)
    return cfg


def _divergence_names() -> tuple[str, ...]:
    # The registry is the one list of divergences. Importing it loads torch (about a second):
    # only validation pays that, never parsing or --help.
    from learner.divergences import divergence_names

    return divergence_names()


def validate(cfg: Config, source: str = "<config>") -> None:
    """Cross-field checks that types alone cannot express."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: {msg}")

    d, r, lr, run = cfg.distill, cfg.rollout, cfg.learner, cfg.run
    _check_ranges(cfg, need)
    need(
        run.name not in ("", ".", "..") and not {"/", "\\", "\0"} & set(run.name),
        "run.name",
        f"must be a plain folder name inside run.out_dir (no '/', no '..'), got {run.name!r}",
    )
    need(
        cfg.eval.max_tokens < r.max_model_len,
        "eval.max_tokens",
        f"must be < rollout.max_model_len ({r.max_model_len}), got {cfg.eval.max_tokens}",
    )
    need(
        d.divergence in _divergence_names(),
        "distill.divergence",
        f"unknown divergence {d.divergence!r}; valid: {', '.join(_divergence_names())}",
    )
    need(0.0 <= d.discount <= 1.0, "distill.discount", f"must be in [0, 1], got {d.discount}")
    need(d.ratio_clip >= 0, "distill.ratio_clip", "must be >= 0 (0 disables clamping)")
    need(d.is_cap >= 1.0, "distill.is_cap", f"must be >= 1, got {d.is_cap}")
    need(
        d.teacher_topk == "full" or d.teacher_topk >= 0,
        "distill.teacher_topk",
        f'must be >= 0 or "full", got {d.teacher_topk}',
    )
    need(
        d.teacher_topk == 0 or d.estimator == "opd_plus",
        "distill.teacher_topk",
        f"the top-K and full-vocabulary estimators are OPD+ (their direct term is exact); "
        f"distill.teacher_topk = {d.teacher_topk!r} needs distill.estimator = 'opd_plus'",
    )
    if d.divergence == "alpha":
        need(
            d.alpha not in (0.0, 1.0),
            "distill.alpha",
            "0 and 1 are forward/reverse KL; use those names",
        )
    need(run.steps >= 1, "run.steps", "must be >= 1")
    need(run.checkpoint_every >= 1, "run.checkpoint_every", "must be >= 1")
    need(
        run.keep_checkpoints >= 2,
        "run.keep_checkpoints",
        f"must be >= 2 (a resume falls back to the previous checkpoint when the newest does not "
        f"verify), got {run.keep_checkpoints}",
    )
    need(
        run.storage == "" or "://" in run.storage,
        "run.storage",
        f"must be a URI such as s3://bucket/prefix or file:///abs/path, got {run.storage!r}",
    )
    need(r.num_samplers >= 1, "rollout.num_samplers", "must be >= 1")
    need(r.num_scorers >= 1, "rollout.num_scorers", "must be >= 1")
    need(r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
    need(r.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
    need(r.max_tokens >= 1, "rollout.max_tokens", "must be >= 1")
    need(
        not cfg.task.environment or r.max_episode_tokens < r.max_model_len,
        "rollout.max_episode_tokens",
        f"must be < rollout.max_model_len ({r.max_model_len}), got {r.max_episode_tokens}",
    )
    need(r.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
    need(r.temperature > 0, "rollout.temperature", "must be > 0 (on-policy sampling)")
    need(d.teacher_temperature > 0, "distill.teacher_temperature", "must be > 0")
    need(0 < r.kv_cache_fraction < 1, "rollout.kv_cache_fraction", "must be in (0, 1)")
    need(r.kv_cache_mb >= 16, "rollout.kv_cache_mb", "must be >= 16")
    need(
        r.max_tokens < r.max_model_len,
        "rollout.max_tokens",
        f"must be < rollout.max_model_len ({r.max_model_len})",
    )
    need(r.sync_timeout_s > 0, "rollout.sync_timeout_s", "must be > 0")
    need(r.max_restarts >= 0, "rollout.max_restarts", "must be >= 0")
    need(r.dispatch_groups >= 0, "rollout.dispatch_groups", "must be >= 0 (0 = auto)")
    batch = r.prompts_per_step * r.samples_per_prompt
    need(
        r.channel_capacity >= batch,
        "rollout.channel_capacity",
        f"must hold at least one step's samples ({batch} = prompts_per_step × samples_per_prompt)",
    )
    need(lr.num_ranks >= 1, "learner.num_ranks", "must be >= 1")
    need(batch % lr.num_ranks == 0, "learner.num_ranks", f"must divide the step's {batch} samples")
    need(
        lr.zero_stage in (0, 1, 2, 3),
        "learner.zero_stage",
        f"must be 0, 1, 2 or 3, got {lr.zero_stage}",
    )
    need(lr.lr > 0, "learner.lr", "must be > 0")
    need(
        len(lr.betas) == 2 and all(0 <= b < 1 for b in lr.betas),
        "learner.betas",
        "must be two numbers in [0, 1)",
    )
    need(lr.sync_every >= 1, "learner.sync_every", "must be >= 1")
    need(
        r.max_staleness >= lr.sync_every - 1,
        "rollout.max_staleness",
        f"must be >= learner.sync_every - 1 = {lr.sync_every - 1}: samplers only ever serve "
        f"pushed versions, so a smaller bound could never be met",
    )
    need(lr.grad_clip >= 0, "learner.grad_clip", "must be >= 0")
    need(lr.threads >= 0, "learner.threads", "must be >= 0 (0 = cpus_per_rank)")
    need(lr.micro_batch_tokens >= 0, "learner.micro_batch_tokens", "must be >= 0 (0 = off)")
    need(lr.logprob_chunk >= 0, "learner.logprob_chunk", "must be >= 0 (0 = full logits)")
    _validate_lora(lr.lora, need)
    if r.sync_backend in ("nccl", "gloo"):
        need(
            not r.in_process,
            "rollout.sync_backend",
            f"{r.sync_backend} broadcasts to sampler actors; rollout.in_process has none "
            "(use 'object_store' or 'auto' in-process)",
        )
    if r.sync_backend == "nccl":
        need(
            nccl_fits(r.sampler_gpus, lr.gpus_per_rank),
            "rollout.sync_backend",
            "nccl needs at least one whole GPU per sampler and per learner rank "
            "(rollout.sampler_gpus, learner.gpus_per_rank): NCCL refuses two ranks on one device",
        )
    if cfg.ray.address == "" and cfg.ray.num_cpus > 0:
        cpus = (
            r.num_samplers * r.sampler_cpus
            + sum(t.num_scorers * t.scorer_cpus for t in teacher_entries(cfg))
            + lr.num_ranks * lr.cpus_per_rank
        )
        need(
            cpus <= cfg.ray.num_cpus,
            "ray.num_cpus",
            f"inconsistent resources: the actors reserve {cpus:g} CPUs (samplers + scorers + learner ranks) but the local "
            f"Ray instance has {cfg.ray.num_cpus}",
        )
    if cfg.ray.address == "" and not os.environ.get("RAY_ADDRESS"):
        # A local instance offers CPUs and the GPUs it finds, never custom resources.
        for key, custom in (
            ("learner.resources", lr.resources),
            ("rollout.sampler_resources", r.sampler_resources),
            ("rollout.scorer_resources", r.scorer_resources),
            *(
                (f"teachers[{i}].scorer_resources", t.scorer_resources)
                for i, t in enumerate(cfg.teachers)
            ),
        ):
            need(
                not custom,
                key,
                f"asks for {custom} but the run starts a local Ray instance (ray.address is "
                f"empty), which has no custom resources; set ray.address to a cluster whose "
                f"nodes offer them, or remove {key}",
            )
    need(cfg.models.teacher != "", "models.teacher", "must name a model folder or 'toy'/'smollm2'")
    _validate_teachers(cfg.teachers, need)
    need(
        not cfg.teachers or d.teacher_topk != "full",
        "distill.teacher_topk",
        "'full' applies one teacher's output layer (models.teacher's) in the learner; with "
        "[[teachers]] set it to 0 or a top-K",
    )
    need(cfg.models.student != "", "models.student", "must name a model folder or 'toy'/'smollm2'")
    _validate_source(cfg.task, need)


# The allowed range of every numeric key, checked by ``validate`` (tests/test_config.py checks
# that every int/float key of the schema is listed). Forms: ">= a", "> a", "[a, b]", "(a, b)",
# "finite" (any number but NaN and ±inf). Every float must also be finite.
RANGES: dict[str, str] = {
    "run.seed": "[0, 4294967295]",
    "run.steps": ">= 1",
    "run.checkpoint_every": ">= 1",
    "run.keep_checkpoints": ">= 2",
    "task.max_prompt_chars": ">= 1",
    "task.eval_size": ">= 1",
    "rollout.num_samplers": ">= 1",
    "rollout.num_scorers": ">= 1",
    "rollout.sampler_cpus": ">= 0",
    "rollout.scorer_cpus": ">= 0",
    "rollout.sampler_gpus": ">= 0",
    "rollout.scorer_gpus": ">= 0",
    "rollout.prompts_per_step": ">= 1",
    "rollout.samples_per_prompt": ">= 1",
    "rollout.max_tokens": ">= 1",
    "rollout.max_turns": ">= 1",
    "rollout.max_episode_tokens": ">= 1",
    "rollout.temperature": "> 0",
    "rollout.max_staleness": ">= 0",
    "rollout.channel_capacity": ">= 1",
    "rollout.kv_cache_mb": ">= 16",
    "rollout.kv_cache_fraction": "(0, 1)",
    "rollout.max_model_len": ">= 2",
    "rollout.sync_timeout_s": "> 0",
    "rollout.call_timeout_s": "> 0",
    "rollout.step_timeout_s": "> 0",
    "rollout.max_restarts": ">= 0",
    "rollout.dispatch_groups": ">= 0",
    "distill.alpha": "finite",
    "distill.discount": "[0, 1]",
    "distill.ratio_clip": ">= 0",
    "distill.is_cap": ">= 1",
    "distill.teacher_temperature": "> 0",
    "distill.teacher_topk": ">= 0",  # or "full" (a string: no range to check)
    "learner.num_ranks": ">= 1",
    "learner.cpus_per_rank": ">= 0",
    "learner.threads": ">= 0",
    "learner.gpus_per_rank": ">= 0",
    "learner.step_timeout_s": "> 0",
    "learner.zero_stage": "[0, 3]",
    "learner.lr": "> 0",
    "learner.warmup_steps": ">= 0",
    "learner.weight_decay": ">= 0",
    "learner.grad_clip": ">= 0",
    "learner.sync_every": ">= 1",
    "learner.micro_batch_tokens": ">= 0",
    "learner.logprob_chunk": ">= 0",
    "learner.lora.rank": ">= 0",
    "learner.lora.alpha": "> 0",
    "learner.lora.dropout": "[0, 1)",
    "eval.every": ">= 0",
    "eval.samples": ">= 1",
    "eval.max_tokens": ">= 1",
    "ray.num_cpus": ">= 0",
    "ray.placement_timeout_s": "> 0",
}


def in_range(value: float, spec: str) -> bool:
    """Whether ``value`` lies in the RANGES ``spec`` (NaN never does)."""
    if value != value or value in (float("inf"), float("-inf")):
        return False
    if spec == "finite":
        return True
    if spec.startswith(">="):
        return value >= float(spec[2:])
    if spec.startswith(">"):
        return value > float(spec[1:])
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    above = value >= lo if spec[0] == "[" else value > lo
    below = value <= hi if spec[-1] == "]" else value < hi
    return above and below


def _check_ranges(cfg: Config, need) -> None:
    for key, spec in RANGES.items():
        value = cfg
        for name in key.split("."):  # learner.lora.rank: a table inside a section
            value = getattr(value, name, None)
        if value is None or isinstance(value, str):  # removed key; or a named choice ("full")
            continue
        if spec == "finite":
            need(in_range(value, spec), key, f"must be a finite number, got {value}")
        elif spec[0] in "[(":
            need(in_range(value, spec), key, f"must be in {spec}, got {value}")
        else:
            need(in_range(value, spec), key, f"must be {spec}, got {value}")


ADDRESS_TIMEOUT_S = 5.0


def check_ray_address(address: str, *, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """A ``ray.address`` of the form ``[ray://]HOST:PORT`` must accept a TCP connection within
    ``timeout_s``: ConfigError naming it otherwise (``ray.init`` would wait on it for minutes).
    Empty, ``local`` and ``auto`` are resolved by Ray when the run starts (services.cluster).
    Called when a run starts (services/run_dir.py), not by ``validate``: a finished run's
    stored config is read again (ledger, eval, scale) after its cluster is gone."""
    import socket

    if address in ("", "local", "auto"):
        return
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"ray.address: expected HOST:PORT (or ray://HOST:PORT, 'auto', empty), got {address!r}"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise ConfigError(
            f"ray.address: nothing answers at {address!r} within {timeout_s:g} s ({exc}); "
            f"start the cluster (ray start --head) or fix the address"
        ) from None


def _validate_source(task: TaskConfig, need) -> None:
    """task.source must be a registered kind, with the options that kind requires."""
    # rollout.sources is standard-library only at import time (reasoning-gym loads lazily).
    from rollout.sources import OPTION_KEYS, SOURCES

    need(
        task.source in SOURCES,
        "task.source",
        f"{task.source!r} is not a registered prompt source; expected one of {', '.join(SOURCES)}",
    )
    options = {"path": task.path, "task": task.name}
    for option in SOURCES[task.source].requires:
        need(
            options[option] != "",
            OPTION_KEYS[option],
            f"source {task.source!r} needs it ({SOURCES[task.source].doc})",
        )
    from rollout.chat_data import FIELDS
    from rollout.verifiers import check_verifier

    if task.verifier:
        why = check_verifier(task.verifier, source=task.source, pattern=task.verifier_pattern)
        need(why is None, "task.verifier", str(why))
    for key, used_by in (
        ("fields", ("chat",)),
        ("chat_template_kwargs", ("chat",)),
        ("eval_path", ("chat", "jsonl")),
    ):
        need(
            not getattr(task, key) or task.source in used_by,
            f"task.{key}",
            f"only the {' and '.join(used_by)} source reads it; task.source is {task.source!r}",
        )
    unknown = sorted(set(task.fields) - set(FIELDS))
    need(
        not unknown, "task.fields", f"unknown keys {unknown}; expected some of {', '.join(FIELDS)}"
    )
    _validate_environment(task, need)


def _validate_environment(task: TaskConfig, need) -> None:
    """task.environment: empty or a registered environment (did-you-mean)."""
    from rollout.environments import ENVIRONMENTS

    need(
        task.environment == "" or task.environment in ENVIRONMENTS,
        "task.environment",
        f"unknown environment {task.environment!r}"
        + _suggest(task.environment, list(ENVIRONMENTS)).replace("valid keys", "valid names"),
    )
    need(
        task.environment != "" or task.environment_system == "",
        "task.environment_system",
        "only an episode reads it; set task.environment too",
    )


def _validate_teachers(teachers: list[TeacherConfig], need) -> None:
    """Each [[teachers]] entry: a distinct plain name, a model, a dtype and >= 1 scorer.
    (Whether the names the data uses are configured, and each teacher's tokenizer, are checked
    when the run starts: services/teachers.py, models.checks.check_pair.)"""
    seen: dict[str, int] = {}
    for i, t in enumerate(teachers):
        key = f"teachers[{i}]"
        need(
            t.name != "" and all(c.isalnum() or c in "_-." for c in t.name),
            f"{key}.name",
            f"must be a plain name (letters, digits, _ - .), got {t.name!r}",
        )
        need(
            t.name not in seen,
            f"{key}.name",
            f"{t.name!r} is also the name of teachers[{seen.get(t.name)}]; names must differ",
        )
        seen[t.name] = i
        need(t.model != "", f"{key}.model", "must name a model folder or 'toy'/'smollm2'")
        need(
            t.dtype in ("", "float32", "bfloat16"),
            f"{key}.dtype",
            f"must be 'float32', 'bfloat16' or empty (models.dtype), got {t.dtype!r}",
        )
        need(t.num_scorers >= 1, f"{key}.num_scorers", f"must be >= 1, got {t.num_scorers}")
        for field_name in ("scorer_cpus", "scorer_gpus"):
            value = getattr(t, field_name)
            need(
                in_range(value, "finite"),
                f"{key}.{field_name}",
                f"must be a number (negative = rollout.{field_name}), got {value}",
            )


def _validate_lora(lora: LoraConfig, need) -> None:
    """Names must be non-empty strings, and set only with a rank (whether the student has
    them is checked against its modules before the learner starts: learner.lora)."""
    bad = [t for t in lora.target_modules if not isinstance(t, str) or not t.strip()]
    need(not bad, "learner.lora.target_modules", f"expected module names, got {bad!r}")
    need(
        lora.rank > 0 or not lora.target_modules,
        "learner.lora.target_modules",
        "set learner.lora.rank > 0 to train adapters (rank 0 = full fine-tuning)",
    )


def to_toml(cfg: Any, prefix: str = "") -> str:
    """Serialise a config tree to TOML (written as the run's resolved config.toml)."""
    scalars, tables = [], []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            tables.append((f.name, value))
        else:
            scalars.append(f"{f.name} = {_toml_value(value)}")
    out = "\n".join(scalars) + ("\n" if scalars else "")
    for name, value in tables:
        out += f"\n[{prefix}{name}]\n" + to_toml(value, f"{prefix}{name}.")
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    if dataclasses.is_dataclass(value):  # an entry of [[teachers]], as an inline table
        return _toml_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    return repr(value)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf field, for ``opdplus config --describe``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            rows += describe(hint, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            doc = f.metadata.get("doc", "")
            if "{sources}" in doc:
                from rollout.sources import SOURCES

                doc = doc.format(sources="; ".join(f"{k.name}: {k.doc}" for k in SOURCES.values()))
            if "{verifiers}" in doc:
                from rollout.verifiers import VERIFIERS

                doc = doc.format(verifiers=", ".join(VERIFIERS))
            if "{divergences}" in doc:
                doc = doc.format(divergences=", ".join(_divergence_names()))
            if "{environments}" in doc:
                from rollout.environments import ENVIRONMENTS

                doc = doc.format(
                    environments="; ".join(f"{k}: {e.doc}" for k, e in ENVIRONMENTS.items())
                )
            rows.append((f"{prefix}{f.name}", _toml_value(default), doc))
    return rows
