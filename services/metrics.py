"""Run metrics: metrics.jsonl (the record), TensorBoard, optional wandb, Ray metrics
(Prometheus, the Ray dashboard, deploy/grafana/opdplus.json), PNG plots.

Every row is flushed as it is written, so a run that dies keeps every step it logged.
Keys are namespaced (``learner/…``, ``distill/…``, ``rollout/…``, ``time/…``, ``eval/…``,
``worker/<actor name>/…``; with several teachers ``teacher/<name>/…`` per step and
``eval/teacher/<name>/…``: services/parts.py::teacher_metrics, evaluate_student). One
``MetricsLogger.log`` call writes a row everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from services.errors import UserError


class DiskError(UserError, OSError):
    """The run directory's disk is full or cannot be written; names the path and what to do."""


# errno → (what happened, what to do), for the disk errors a user can fix.
_DISK_ERRORS = {
    errno.ENOSPC: (
        "no space left on the device",
        "free space there (or set run.out_dir to a larger disk) and resume with --resume",
    ),
    errno.EDQUOT: (
        "the disk quota is exceeded",
        "free space there (or set run.out_dir to another disk) and resume with --resume",
    ),
    errno.EROFS: (
        "the file system is read-only",
        "set run.out_dir to a writable folder (or remount it read-write)",
    ),
    errno.EACCES: (
        "permission denied",
        "set run.out_dir to a folder you can write to (or fix its permissions)",
    ),
    errno.EPERM: (
        "operation not permitted",
        "set run.out_dir to a folder you can write to (or fix its permissions)",
    ),
}


def disk_error(exc: OSError, path: Path | str) -> OSError:
    """``exc`` as a DiskError naming ``path`` when it is a full or unwritable disk; any other
    OSError is returned unchanged (it keeps its traceback)."""
    known = _DISK_ERRORS.get(exc.errno)
    if known is None or isinstance(exc, DiskError):
        return exc
    what, todo = known
    return DiskError(exc.errno, f"cannot write {path}: {what}; {todo}")


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str = "opdplus",
        run_name: str = "run",
        config: dict | None = None,
        resume_from_step: int | None = None,
        ray_metrics: bool = True,
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        with _disk(self.path):
            if resume_from_step is not None:
                _truncate_after(self.path, resume_from_step)
                _truncate_after(self.samples_path, resume_from_step)
            self._file = self.path.open("a", buffering=1)
            self._samples = self.samples_path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        # Live gauges on Ray's Prometheus endpoint (only when this process is connected to Ray).
        self._ray = process_metrics(run_name) if ray_metrics else None
        self._wandb = None
        if wandb:
            import wandb as wandb_lib  # optional dependency: pip install opdplus[wandb]

            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb_lib.init(
                project=wandb_project, name=run_name, dir=str(run_dir), config=config or {}
            )

    def log(self, step: int, values: dict[str, Any], ledger: dict | None = None) -> None:
        """Append one row (flushed); ``ledger``: the step's row of samples.jsonl (which samples
        it trained on: services/ledger.py::ledger_row), written first."""
        if ledger is not None:
            with _disk(self.samples_path):
                self._samples.write(json.dumps(ledger) + "\n")
                self._samples.flush()
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        with _disk(self.path):
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        for key, value in values.items():
            if self._tb is not None:
                if isinstance(value, list) and value:
                    import numpy as np

                    self._tb.add_histogram(key, np.asarray(value), step)
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in values.items() if not isinstance(v, list)}, step=step)
        if self._ray is not None and "learner/loss" in values:
            self._ray.step(step, values)

    def close(self) -> None:
        for f in (self._file, self._samples):
            with contextlib.suppress(OSError):  # a full disk: the write raised DiskError already
                f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _ray_connected() -> bool:
    import sys

    ray = sys.modules.get("ray")  # never import Ray here: metrics also runs without it
    return ray is not None and ray.is_initialized()


# Ray metric name (exported to Prometheus as ``ray_<name>``) → (row key, description).
STEP_GAUGES: dict[str, tuple[str, str]] = {
    "opdplus_step": ("", "last learner step logged"),
    "opdplus_samples_per_s": ("perf/samples_per_s", "samples trained per second of step time"),
    "opdplus_tokens_per_s": ("perf/tokens_per_s", "response tokens trained per second"),
    "opdplus_channel_depth": (
        "rollout/channel_depth",
        "scored samples waiting in the channel between scorers and learner",
    ),
    "opdplus_staleness_mean": ("rollout/staleness_mean", "mean policy-version lag of a batch"),
    "opdplus_staleness_max": ("rollout/staleness_max", "largest policy-version lag of a batch"),
    "opdplus_divergence": ("distill/divergence", "per-token divergence to the teacher"),
    "opdplus_clamped_frac": ("distill/clamped_frac", "fraction of tokens with ell clamped"),
    "opdplus_is_truncated_frac": (
        "distill/is_truncated_frac",
        "fraction of tokens whose importance weight was truncated at distill.is_cap",
    ),
    "opdplus_weight_sync_seconds": ("time/sync", "seconds the step spent pushing weights"),
    "opdplus_loss": ("learner/loss", "surrogate loss"),
    "opdplus_restarts": ("", "worker restarts so far (all roles)"),
}
WORKER_GAUGES: dict[str, str] = {
    "opdplus_worker_samples_per_s": "samples a worker produced per second since the last step",
    "opdplus_worker_samples": "samples a worker has produced in this run",
    "opdplus_worker_restarts": "times a worker was restarted",
}
CHANNEL_DEPTH_KEYS = ("rollout/channel_depth", "rollout/channel_count", "rollout/channel_size")


class RayMetrics:
    """The per-step row as ``ray.util.metrics`` gauges (tag ``run``; per-worker ones also
    ``role`` and ``worker``), read by Ray's Prometheus endpoint and the dashboard.

    Gauges, not counters: a row holds the step's value (or a worker's running total), and
    Prometheus' ``rate()`` works on the ``*_samples`` totals too. Worker keys in the row are
    ``worker/<actor name>/samples`` and ``worker/<actor name>/restarts`` (the pools' counters);
    the role is the actor name without its index (``student-sampler``).
    """

    def __init__(self, run_name: str) -> None:
        from ray.util.metrics import Gauge

        self.tags = {"run": run_name}
        self.gauges = {
            name: Gauge(name, description=doc, tag_keys=("run",))
            for name, (_, doc) in STEP_GAUGES.items()
        }
        self.worker_gauges = {
            name: Gauge(name, description=doc, tag_keys=("run", "role", "worker"))
            for name, doc in WORKER_GAUGES.items()
        }
        self._last: dict[str, tuple[float, float]] = {}  # worker → (time, samples)

    def step(self, step: int, row: dict[str, Any]) -> None:
        values = {"opdplus_step": float(step)}
        for name, (key, _) in STEP_GAUGES.items():
            v = row.get(key) if key else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                values[name] = float(v)
        if "opdplus_channel_depth" not in values:
            for key in CHANNEL_DEPTH_KEYS:
                if isinstance(row.get(key), (int, float)):
                    values["opdplus_channel_depth"] = float(row[key])
                    break
        now = time.time()
        restarts = 0.0
        for worker, fields in _worker_fields(row).items():
            tags = self.tags | {"role": worker.rsplit("-", 1)[0], "worker": worker}
            if "samples" in fields:
                total = fields["samples"]
                self.worker_gauges["opdplus_worker_samples"].set(total, tags=tags)
                t0, s0 = self._last.get(worker, (None, 0.0))
                if t0 is not None and now > t0:
                    rate = max(0.0, total - s0) / (now - t0)
                    self.worker_gauges["opdplus_worker_samples_per_s"].set(rate, tags=tags)
                self._last[worker] = (now, total)
            if "restarts" in fields:
                restarts += fields["restarts"]
                self.worker_gauges["opdplus_worker_restarts"].set(fields["restarts"], tags=tags)
        values["opdplus_restarts"] = restarts
        for name, v in values.items():
            self.gauges[name].set(v, tags=self.tags)


def _worker_fields(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``worker/<name>/<field>`` keys of a row → {name: {field: value}}."""
    out: dict[str, dict[str, float]] = {}
    for key, v in row.items():
        if key.startswith("worker/") and isinstance(v, (int, float)):
            _, name, field = key.split("/", 2)
            out.setdefault(name, {})[field] = float(v)
    return out


_PROCESS_METRICS: RayMetrics | None = None


def process_metrics(run_name: str | None = None) -> RayMetrics | None:
    """This process's RayMetrics (None without Ray); ``run_name`` sets the ``run`` tag (the
    driver's MetricsLogger does). One instance per process: Ray metrics are process-wide."""
    global _PROCESS_METRICS
    if not _ray_connected():
        return None
    if _PROCESS_METRICS is None:
        _PROCESS_METRICS = RayMetrics(run_name or "run")
    elif run_name:
        _PROCESS_METRICS.tags = {"run": run_name}
    return _PROCESS_METRICS


def _truncate_after(path: Path, step: int) -> None:
    """Keep rows up to ``step``. Rows a crashed run wrote after its last checkpoint move to
    ``<name>.discarded.jsonl`` (kept, not deleted), so no step appears twice after a resume."""
    if not path.exists():
        return
    keep, drop = [], []
    for line, row in _parse_rows(path):
        (keep if row is not None and row.get("step", 0) <= step else drop).append(line)
    if drop:
        with path.with_suffix(".discarded.jsonl").open("a") as f:
            f.write("\n".join(drop) + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class TornFileError(UserError, ValueError):
    """A JSON-lines file of a run has a broken row before its last one; names the file and line."""


def _parse_rows(path: Path) -> list[tuple[str, dict | None]]:
    """(line, row) for every non-empty line of a JSON-lines file. A half-written last line (a
    crash mid-write) gets row None, with a warning on the console; a broken line before the
    last is corruption, not a crash, and raises TornFileError naming the file and line."""
    lines = [(i, line) for i, line in enumerate(Path(path).read_text().splitlines(), 1)]
    lines = [(i, line) for i, line in lines if line.strip()]
    out: list[tuple[str, dict | None]] = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as exc:
            if n < len(lines) - 1:
                raise TornFileError(
                    f"{path}:{i}: not a JSON row ({exc}); the file is corrupt"
                ) from None
            from services.console import say

            say(
                f"[opdplus] warning: {path}:{i}: dropped a half-written last row "
                f"({len(line)} characters; a crash while it was written)"
            )
            row = None
        out.append((line, row))
    return out


def read_rows(path: Path) -> list[dict]:
    """The rows of a run's JSON-lines file (metrics.jsonl, samples.jsonl), without a
    half-written last row (see ``_parse_rows``)."""
    return [row for _, row in _parse_rows(path) if row is not None]


def read_metrics(path: Path) -> list[dict]:
    return read_rows(path)


class _disk:
    """Turn a full or unwritable disk inside the block into a DiskError naming ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> None:
        if isinstance(exc, OSError) and not isinstance(exc, DiskError):
            err = disk_error(exc, self.path)
            if err is not exc:
                raise err from None


def write_plots(run_dir: Path) -> list[Path]:
    """PNG plots of divergence, loss and student accuracy against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    out = []
    panels = [
        ("divergence", "distill/divergence", "per-token divergence to the teacher"),
        ("loss", "learner/loss", "surrogate loss"),
        ("accuracy", "eval/greedy_acc", "student held-out accuracy (greedy)"),
    ]
    for name, key, title in panels:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(run_dir) / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out
