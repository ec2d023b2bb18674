"""Run metrics: metrics.jsonl (the record), TensorBoard, optional wandb, PNG plots.

Every row is flushed as it is written, so a run that dies keeps every step it logged.
Keys are namespaced (``learner/…``, ``distill/…``, ``rollout/…``, ``time/…``, ``eval/…``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


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
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        if resume_from_step is not None:
            _truncate_after(self.path, resume_from_step)
            _truncate_after(self.samples_path, resume_from_step)
        self._file = self.path.open("a", buffering=1)
        self._samples = self.samples_path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self._wandb = None
        if wandb:
            import wandb as wandb_lib  # optional dependency: pip install opdplus[wandb]

            os.environ.setdefault("WANDB_MODE", "offline")
            self._wandb = wandb_lib.init(
                project=wandb_project, name=run_name, dir=str(run_dir), config=config or {}
            )

    def log(self, step: int, values: dict[str, Any], batch=None, ledger=None) -> None:
        """Append one row (flushed); with ``batch``, also which samples the step trained on
        (``ledger``: extra per-sample columns for samples.jsonl, same order as ``batch``)."""
        if batch is not None:
            self.log_samples(
                step,
                [s.sample_id for s in batch],
                [s.policy_version for s in batch],
                **(ledger or {}),
            )
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
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

    def log_samples(
        self, step: int, sample_ids: list[str], versions: list[int], **columns: list
    ) -> None:
        """Which samples each step trained on (the audit trail resume is checked against);
        ``columns``: more per-sample lists (sampler, scorer, attempt, ...; services/ledger.py)."""
        row = {"step": step, "sample_ids": sample_ids, "versions": versions, **columns}
        self._samples.write(json.dumps(row) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._file.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """Keep rows up to ``step``. Rows a crashed run wrote after its last checkpoint move to
    ``<name>.discarded.jsonl`` (kept, not deleted), so no step appears twice after a resume."""
    if not path.exists():
        return
    keep, drop = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            (keep if json.loads(line).get("step", 0) <= step else drop).append(line)
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


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


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
