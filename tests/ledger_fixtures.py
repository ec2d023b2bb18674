"""A synthetic run directory for the ledger checker: a resolved ``config.toml`` and the
``samples.jsonl`` a correct run of it would write, built without any engine.

The batches are dealt by a fresh prompt source made from the config's own task settings
(``rollout.sources.make_source``, not the checker's replay), in the order a real run writes
them (sorted by sample id); versions alternate between fresh (``step - 1``) and one step stale,
so a clean ledger already sits on the staleness bound.
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS_PER_STEP = 2
SAMPLES_PER_PROMPT = 2
MAX_STALENESS = 1
STEPS = 3
SAMPLERS = ("student-sampler-0", "student-sampler-1")
SCORERS = ("teacher-scorer-0",)


def ledger_config(run_name: str = "ledger-test", out_dir: str = "runs"):
    from services.config import load_config

    return load_config(
        None,
        [
            f'run.name="{run_name}"',
            f'run.out_dir="{out_dir}"',
            f"run.steps={STEPS}",
            'task.source="arithmetic"',
            f"rollout.prompts_per_step={PROMPTS_PER_STEP}",
            f"rollout.samples_per_prompt={SAMPLES_PER_PROMPT}",
            f"rollout.max_staleness={MAX_STALENESS}",
        ],
    )


def dealt_batches(cfg, steps: int = STEPS) -> list[list[str]]:
    """Sample ids the config's prompt source deals for steps 1..steps, each step sorted."""
    from rollout.sources import make_source

    t = cfg.task
    source = make_source(
        t.source,
        path=t.path or None,
        seed=cfg.run.seed,
        task=t.name or None,
        max_prompt_chars=t.max_prompt_chars,
    )
    r = cfg.rollout
    return [
        sorted(
            f"{p.id}/{k}"
            for p in source.next_batch(r.prompts_per_step)
            for k in range(r.samples_per_prompt)
        )
        for _ in range(steps)
    ]


def clean_rows(cfg, steps: int = STEPS) -> list[dict]:
    """The ledger rows of a correct run: step k trains exactly the k-th dealt batch."""
    rows = []
    for step, ids in enumerate(dealt_batches(cfg, steps), start=1):
        n = len(ids)
        rows.append(
            {
                "step": step,
                "sample_ids": ids,
                # Odd samples were drawn one version earlier (the bound, max_staleness = 1);
                # step 1 has only version 0.
                "versions": [max(0, step - 1 - (i % 2)) for i in range(n)],
                "samplers": [SAMPLERS[i % len(SAMPLERS)] for i in range(n)],
                "scorers": [SCORERS[0]] * n,
                "attempts": [2 if (step, i) == (2, 0) else 1 for i in range(n)],
                "response_crc": [1000 * step + i for i in range(n)],
            }
        )
    return rows


def write_run_dir(run_dir: Path, cfg=None, rows: list[dict] | None = None) -> Path:
    """Write ``config.toml`` (``services.config.to_toml``) and ``samples.jsonl`` to ``run_dir``."""
    from services.config import to_toml

    cfg = cfg if cfg is not None else ledger_config(run_dir.name, str(run_dir.parent))
    rows = rows if rows is not None else clean_rows(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(cfg))
    (run_dir / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run_dir
