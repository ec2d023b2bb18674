"""The run directory: the checks before a run writes anything there, the lock that keeps a
second driver out, and resume compatibility.

``prepare_run_dir`` is the one place a run directory is opened. In order: the directory is
locked (``run.lock``, an exclusive ``flock`` held for the whole run; a second driver is refused
at once with the holder's pid and host), the state is checked (a fresh run never reuses a run
directory; ``--resume`` needs a checkpoint, and the new config must train the same thing as
the stored ``config.toml``: ``check_resume``), and only then is ``config.toml`` (re)written.

Resume compatibility is decided key by key in one registry, ``TRAINED_KEYS`` and
``HARMLESS_KEYS``: every config key is in exactly one of them (tests/test_run_dir.py checks
that against the schema, so a new key must be classified). A change to a trained key (models,
batch shape, steps, seed, divergence, estimator, optimizer, ranks, ...) is refused with a diff;
a harmless one (evaluation cadence, logging, placement, Ray, worker counts) is allowed. The
config is also stored with every checkpoint (the driver's state dict, ``"config"``) and checked
again once a checkpoint is loaded.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tomllib
from pathlib import Path
from typing import Any

from services.config import Config, check_ray_address, schema_hints, to_toml
from services.errors import UserError

LOCK_NAME = "run.lock"
CONFIG_NAME = "config.toml"


class RunDirError(UserError, RuntimeError):
    """A run directory cannot be used as asked; the message names it and what to do."""


class RunDirLocked(RunDirError):
    """Another driver holds the run directory's lock."""


class ResumeMismatch(RunDirError):
    """``--resume`` with a config that would train something else than the checkpoint."""


# ----------------------------------------------------------------------------- registry

# Keys whose change alters what is trained (the model, data, batch, objective, optimizer, or
# the checkpoint's layout): resuming with a different value is refused.
TRAINED_KEYS: frozenset[str] = frozenset(
    {
        "run.seed",
        "run.steps",
        "models.teacher",
        "teachers",
        "models.student",
        "models.dtype",
        "task.source",
        "task.path",
        "task.name",
        "task.max_prompt_chars",
        "task.eval_path",  # without it, the seeded hold-out comes out of the training rows
        "task.fields",
        "task.chat_template_kwargs",  # the prompt token ids
        "task.environment",  # episodes: what answers the student, and the tokens trained on
        "task.environment_system",
        "rollout.prompts_per_step",
        "rollout.samples_per_prompt",
        "rollout.max_tokens",
        "rollout.temperature",
        "rollout.max_staleness",
        "rollout.max_model_len",
        "rollout.max_turns",
        "rollout.max_episode_tokens",
        "distill.divergence",
        "distill.alpha",
        "distill.estimator",
        "distill.discount",
        "distill.ratio_clip",
        "distill.is_cap",
        "distill.aggregation",
        "distill.center_cost",
        "distill.teacher_temperature",
        "distill.teacher_topk",
        "learner.num_ranks",
        "learner.zero_stage",
        "learner.lr",
        "learner.lr_schedule",
        "learner.warmup_steps",
        "learner.weight_decay",
        "learner.betas",
        "learner.grad_clip",
        "learner.precision",
        "learner.sync_every",
        "learner.lora.rank",  # what trains, and the checkpoint's layout (adapters only)
        "learner.lora.alpha",
        "learner.lora.dropout",
        "learner.lora.target_modules",
    }
)

# Keys that change how or where a run executes, what it logs or how it evaluates, not what is
# trained: resuming with a different value is allowed.
HARMLESS_KEYS: frozenset[str] = frozenset(
    {
        "run.name",
        "run.out_dir",
        "run.checkpoint_every",
        "run.keep_checkpoints",
        "task.eval_size",
        "task.verifier",  # scores evaluation only; training never reads answers
        "task.verifier_pattern",
        "rollout.num_samplers",
        "rollout.num_scorers",
        "rollout.sampler_cpus",
        "rollout.scorer_cpus",
        "rollout.sampler_gpus",
        "rollout.scorer_gpus",
        "rollout.sampler_resources",
        "rollout.scorer_resources",
        "rollout.channel_capacity",
        "rollout.kv_cache_mb",
        "rollout.kv_cache_fraction",
        "rollout.sync_timeout_s",
        "rollout.sync_backend",
        "rollout.max_restarts",
        "rollout.dispatch_groups",
        "rollout.in_process",
        "learner.cpus_per_rank",
        "learner.threads",
        "learner.gpus_per_rank",
        "learner.resources",
        "learner.micro_batch_tokens",  # gradient accumulation: the same optimizer step
        "learner.logprob_chunk",  # the same log-probs, computed in chunks
        "eval.every",
        "eval.samples",
        "eval.max_tokens",
        "log.tensorboard",
        "log.wandb",
        "log.wandb_project",
        "log.plots",
        "log.progress",
        "ray.address",
        "ray.num_cpus",
        "ray.dashboard",
        "ray.placement_timeout_s",
        "run.storage",  # where checkpoints are copied to, not what they hold
        "rollout.call_timeout_s",
        "rollout.step_timeout_s",
        "learner.step_timeout_s",
    }
)


def config_keys() -> list[str]:
    """Every leaf key of the config schema (``section.key``)."""
    return list(schema_hints())


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in _DICT_KEYS:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


_DICT_KEYS = frozenset(k for k, h in schema_hints().items() if h is dict)


def resume_diff(old_toml: str, cfg: Config) -> list[str]:
    """``key: old → new`` for every trained key whose value differs between the stored config
    (TOML text) and ``cfg``. A key missing from the stored config counts as its default (a
    config written before the key existed); a key this registry does not know counts as
    trained (refused rather than silently resumed)."""
    old = flatten(tomllib.loads(old_toml))
    new = flatten(tomllib.loads(to_toml(cfg)))
    defaults = flatten(tomllib.loads(to_toml(Config())))
    lines = []
    for key in sorted(new):
        if key in HARMLESS_KEYS:
            continue
        before = old.get(key, defaults.get(key))
        if before != new[key]:
            lines.append(f"  {key}: {_show(before)} → {_show(new[key])}")
    return lines


def _show(value: Any) -> str:
    return "(unset)" if value is None else repr(value)


def check_resume(old_toml: str, cfg: Config, *, where: Path | str) -> None:
    """Refuse to resume from ``where`` (the stored config's file or checkpoint) with a config
    that trains something else; the message lists each change as ``key: old → new``."""
    diff = resume_diff(old_toml, cfg)
    if diff:
        raise ResumeMismatch(
            f"--resume: the config differs from the one {where} was trained with in keys that "
            f"change what is trained:\n" + "\n".join(diff) + "\n"
            "Resume with the original values (the run's config.toml), or start a new run "
            "(another run.name) to train with these."
        )


# ----------------------------------------------------------------------------- the lock


class RunDirLock:
    """An exclusive ``flock`` on ``<run_dir>/run.lock``, held until ``close()`` (or the end of
    a ``with`` block, or the process: the kernel drops a dead process's lock). The file says
    which process holds it (pid and host), for the message a second driver gets."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        fd = _os_call(lambda: os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirLocked(
                    f"{run_dir} is in use by another driver ({holder}); wait for it to finish "
                    f"or stop it, or choose another run.name"
                ) from None
            raise
        self._fd: int | None = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)

    def close(self) -> None:
        """Release the lock (idempotent). The file stays: removing it would race with a
        driver that has it open and is about to lock it."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def _os_call(fn, path: Path):
    """``fn()``, with a full or read-only disk as a RunDirError naming ``path``."""
    from services.metrics import disk_error

    try:
        return fn()
    except OSError as exc:
        raise disk_error(exc, path) from None


# ----------------------------------------------------------------------------- prepare


def prepare_run_dir(cfg: Config, *, resume: bool) -> tuple[Path, RunDirLock]:
    """Check that ``ray.address`` answers, lock ``<run.out_dir>/<run.name>``, check it suits a
    fresh run (or ``--resume``), then write its ``config.toml``. Returns the directory and its held lock: the caller closes the
    lock when the run ends (``close()`` or ``with``); a failed check releases it here."""
    from services import storage
    from services.parts import checkpoint_dir

    check_ray_address(cfg.ray.address)  # a cluster that does not answer: an error in seconds
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if resume and not cfg.run.storage and not (checkpoint_dir(run_dir) / "latest").exists():
        raise RunDirError(f"--resume: {run_dir} has no checkpoint to resume from")
    _os_call(lambda: run_dir.mkdir(parents=True, exist_ok=True), run_dir)
    lock = RunDirLock(run_dir)
    try:
        if resume:  # under the lock: never write the marker of a run another driver holds
            storage.pull_latest(cfg)  # run.storage: the remote checkpoints' `latest`, if any
        # Checked again under the lock: a driver that just finished may have changed it.
        has_ckpt = (checkpoint_dir(run_dir) / "latest").exists()
        if resume and not has_ckpt:
            raise RunDirError(f"--resume: {run_dir} has no checkpoint to resume from")
        if not resume and ((run_dir / "metrics.jsonl").exists() or has_ckpt):
            raise RunDirError(
                f"{run_dir} already holds a run; pass --resume to continue it, or choose "
                f"another run.name (e.g. --set run.name=...) — nothing there is overwritten"
            )
        stored = run_dir / CONFIG_NAME
        if resume and stored.is_file():
            check_resume(stored.read_text(), cfg, where=stored)
        _write_atomic(stored, to_toml(cfg))
    except BaseException:
        lock.close()
        raise
    return run_dir, lock


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")

    def write() -> None:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    _os_call(write, path)
