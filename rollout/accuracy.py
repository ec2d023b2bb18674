"""Held-out evaluation through the vLLM engine: greedy accuracy and sampled avg@k, with 95 % CIs.

    greedy accuracy  = (1/N) Σ_i 1[greedy completion of problem i is correct]
                       CI: Wilson score interval for a binomial proportion.
    avg@k            = (1/N) Σ_i (1/k) Σ_j 1[sample j of problem i is correct]   (temperature τ)
                       CI: normal approximation over problems, mean ± 1.96 · sd(p_i) / √N, since
                       the k samples of one problem are not independent of each other.
    pass@k           = (1/N) Σ_i 1[any of the k samples is correct]              (no CI)

"Correct" means a score of 1 from ``rollout.sources.score`` (the built-in verifier, or the
reasoning-gym task's own scorer); ``mean_reward`` also reports partial credit.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rollout.prompting import encode_prompt
from rollout.sources import Problem, score

Z95 = 1.959963984540054
N_EXAMPLES = 5  # greedy completions kept in the report, for eyeballing


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n``; (0, 1) when n = 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """Normal-approximation CI of the mean of ``values`` (one per problem), clipped to [0, 1]."""
    if len(values) < 2:
        return 0.0, 1.0
    mean = statistics.fmean(values)
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return max(0.0, mean - half), min(1.0, mean + half)


def evaluate(
    model_dir: str | Path,
    problems: Sequence[Problem],
    *,
    engine=None,
    engine_factory: Callable[[Path], Any] | None = None,
    k: int = 4,
    max_tokens: int = 48,
    seed: int = 0,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """Evaluate the model in ``model_dir`` on ``problems``; returns a JSON-serialisable dict.

    ``engine``: a running ``StudentEngine`` serving that model (left open). Otherwise one is
    built by ``engine_factory(model_dir)`` and closed (``services.eval_command`` builds them).
    ``k = 0`` skips the sampled metrics. ``temperature``: τ of the k samples (greedy is τ = 0);
    the report records both.
    """
    from transformers import AutoTokenizer

    if not problems:
        raise ValueError("evaluate needs at least one problem")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in problems]
    if engine is None and engine_factory is None:
        raise ValueError("evaluate needs a running engine or an engine_factory")
    owned = engine is None
    if owned:
        engine = engine_factory(model_dir)
    start = time.perf_counter()
    try:
        greedy = engine.generate(prompt_ids, max_tokens=max_tokens, temperature=0.0, n=1, seed=seed)
        sampled = (
            engine.generate(
                prompt_ids, max_tokens=max_tokens, temperature=temperature, n=k, seed=seed
            )
            if k
            else []
        )
    finally:
        if owned:
            engine.close()
    seconds = time.perf_counter() - start

    def scored(problem: Problem, gens) -> list[tuple[str, float]]:
        texts = [tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in gens]
        return [(t, score(problem, t)) for t in texts]

    report: dict[str, Any] = {
        "model": str(model_dir),
        "n_problems": len(problems),
        "k": k,
        "max_tokens": max_tokens,
        "seed": seed,
    }
    greedy_scores, examples = [], []
    for problem, gens in zip(problems, greedy, strict=True):
        [(text, s)] = scored(problem, gens)
        greedy_scores.append(s)
        if len(examples) < N_EXAMPLES:
            examples.append(
                {"prompt": problem.prompt, "completion": text, "answer": problem.answer, "score": s}
            )
    n_correct = sum(s >= 1.0 for s in greedy_scores)
    gens_flat = [g for gens in greedy for g in gens]
    report["greedy"] = {
        "temperature": 0.0,
        "accuracy": n_correct / len(problems),
        "ci95": list(wilson_interval(n_correct, len(problems))),
        "n_correct": n_correct,
        "mean_reward": statistics.fmean(greedy_scores),
        "truncated_fraction": sum(g.finish_reason == "length" for g in gens_flat) / len(gens_flat),
        "mean_tokens": statistics.fmean(len(g.token_ids) for g in gens_flat),
    }
    if k:
        per_problem = []
        any_correct = 0
        rewards = []
        for problem, gens in zip(problems, sampled, strict=True):
            scores_k = [s for _, s in scored(problem, gens)]
            per_problem.append(sum(s >= 1.0 for s in scores_k) / k)
            any_correct += any(s >= 1.0 for s in scores_k)
            rewards.extend(scores_k)
        report["avg_at_k"] = {
            "temperature": temperature,
            "accuracy": statistics.fmean(per_problem),
            "ci95": list(mean_interval(per_problem)),
            "mean_reward": statistics.fmean(rewards),
        }
        report["pass_at_k"] = any_correct / len(problems)
    report["examples"] = examples
    report["seconds"] = seconds
    return report
