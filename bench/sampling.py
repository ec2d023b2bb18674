"""Sampling benchmark: vLLM ``StudentEngine.generate`` tokens/s on the toy student over
transformers ``generate`` tokens/s, same model, prompts and ``max_new_tokens`` (target >= 5x).

Both sides sample at temperature 1 with no top-k / top-p, stop at EOS, and count the tokens
actually generated (each row up to and including its first EOS); one warm-up call is excluded
on each side. The transformers baseline runs first: an in-process vLLM CPU engine pins this
process's OpenMP threads. vLLM requests are seeded per prompt as the pipeline does; the
unseeded rate is recorded too (per-request generators are a per-step cost in vLLM's sampler).

Run from the repository root::

    .venv/bin/python bench/sampling.py            # toy student, batch 128 x 40 new tokens
    .venv/bin/python bench/sampling.py --quick    # smoke test: tiny model, batch 32 x 16

Results: a table on stdout, ``<out>/sampling-<timestamp>.json`` and ``sampling-latest.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from common import (
    arithmetic_prompts,
    hf_sampling,
    open_engine,
    run,
    toy_engine_settings,
    toy_pair,
    vllm_sampling,
)

NAME = "sampling"
TARGET = 5.0  # vLLM tokens/s over transformers tokens/s, toy student


@dataclass(frozen=True)
class Sizes:
    batch: int = 128
    new_tokens: int = 40


QUICK = Sizes(batch=32, new_tokens=16)


def measure(report: dict, sizes: Sizes, args: argparse.Namespace) -> None:
    from rollout.engine import StudentEngine

    pair = toy_pair(args.quick)
    prompts = arithmetic_prompts(pair.student_dir, sizes.batch)
    hf = hf_sampling(pair.student_dir, prompts, new_tokens=sizes.new_tokens, dtype="float32")
    with open_engine(StudentEngine, toy_engine_settings(pair.student_dir)) as (engine, start_s):
        fig, _ = vllm_sampling(engine, prompts, new_tokens=sizes.new_tokens)
        fig["engine_start_s"] = start_s
        fig["unseeded_tokens_per_s"] = vllm_sampling(
            engine, prompts, new_tokens=sizes.new_tokens, seeded=False
        )[0]["tokens_per_s"]
    ratio = fig["tokens_per_s"] / hf["tokens_per_s"]
    report["sampling"] = {
        "pair": pair.name,
        "vllm": fig,
        "transformers": hf,
        "ratio": ratio,
        "target": TARGET,
        "meets_target": ratio >= TARGET,
    }


def table(report: dict) -> list[tuple[str, str, str]]:
    s = report["sampling"]
    return [
        (
            f"sampling {s['pair']}, batch {s['vllm']['batch']}: vLLM "
            f"{s['vllm']['tokens_per_s']:.0f} tok/s (unseeded "
            f"{s['vllm']['unseeded_tokens_per_s']:.0f}) vs transformers "
            f"{s['transformers']['tokens_per_s']:.0f}",
            f"{s['ratio']:.1f}x",
            f">= {TARGET:.0f}x",
        )
    ]


def main(argv: list[str] | None = None) -> None:
    quick_help = "tiny model, small batch (smoke test)"
    run(NAME, __doc__, measure, table, (Sizes(), QUICK), quick_help, smollm=False, argv=argv)


if __name__ == "__main__":
    main()
