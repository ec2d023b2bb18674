"""Held-out evaluation through the vLLM engine: greedy accuracy and sampled avg@k, with 95 % CIs.

    greedy accuracy  = (1/N) Σ_i 1[greedy completion of problem i is correct]
                       CI: Wilson score interval for a binomial proportion.
    avg@k            = (1/N) Σ_i (1/k) Σ_j 1[sample j of problem i is correct]   (temperature τ)
                       CI: normal approximation over problems, mean ± 1.96 · sd(p_i) / √N, since
                       the k samples of one problem are not independent of each other.
    pass@k           = (1/N) Σ_i 1[any of the k samples is correct]              (no CI)

Prompt-only held-out rows (no answers: the teacher is the reference), ``evaluate_prompt_only``:

    reverse KL       = (1/N) Σ_i d_i,  d_i = Σ_j Σ_t [log π_S(y_ijt) − log π_T(y_ijt)] / Σ_j R_ij
                       over the k samples y_ij ~ π_S (τ = 1) of prompt i, R_ij tokens each: the
                       per-token Monte-Carlo estimate of KL(π_S ‖ π_T) (can come out below 0).
                       CI: mean ± 1.96 · sd(d_i) / √N over prompts (unclipped).
    greedy agreement = (1/N) Σ_i 1[student's greedy text == teacher's greedy text]
                       (decoded, special tokens dropped); CI: Wilson.

"Correct" means a score of 1 from ``rollout.sources.score`` (the built-in verifier, or the
reasoning-gym task's own scorer); ``mean_reward`` also reports partial credit.

With an environment (``episodes``: task.environment), every completion is an episode
(``rollout.episodes``) and the verifier scores the student's turns joined (a tool's answer
cannot supply the answer); the report adds ``tool_call_rate``, the fraction of episodes that
called the tool at least once, to the greedy and sampled figures.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from rollout.prompting import encode_prompt, render_text
from rollout.records import Rollout
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


def mean_interval(
    values: Sequence[float], z: float = Z95, *, bounds: tuple[float, float] = (0.0, 1.0)
) -> tuple[float, float]:
    """Normal-approximation CI of the mean of ``values`` (one per problem), clipped to
    ``bounds`` (a proportion's [0, 1] by default); ``bounds`` itself for fewer than 2 values."""
    lo, hi = bounds
    if len(values) < 2:
        return lo, hi
    mean = statistics.fmean(values)
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return max(lo, mean - half), min(hi, mean + half)


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
    episodes=None,
    max_model_len: int = 0,
) -> dict[str, Any]:
    """Evaluate the model in ``model_dir`` on ``problems``; returns a JSON-serialisable dict.

    ``engine``: a running ``StudentEngine`` serving that model (left open). Otherwise one is
    built by ``engine_factory(model_dir)`` and closed (``services.eval_command`` builds them).
    ``k = 0`` skips the sampled metrics. ``temperature``: τ of the k samples (greedy is τ = 0);
    the report records both. ``episodes``: a ``rollout.episodes.EpisodeSettings`` (module
    docstring), with the engines' ``max_model_len``.
    """
    from transformers import AutoTokenizer

    if not problems:
        raise ValueError("evaluate needs at least one problem")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    model_dir = Path(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [p.prompt if episodes is None else episodes.prompt(p) for p in problems]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    if engine is None and engine_factory is None:
        raise ValueError("evaluate needs a running engine or an engine_factory")
    owned = engine is None
    if owned:
        engine = engine_factory(model_dir)
    start = time.perf_counter()
    generate = engine.generate
    if episodes is not None:
        generate = _episodes(generate, tokenizer, problems, prompt_ids, episodes, max_model_len)
    try:
        greedy = generate(prompt_ids, max_tokens=max_tokens, temperature=0.0, n=1, seed=seed)
        sampled = (
            generate(prompt_ids, max_tokens=max_tokens, temperature=temperature, n=k, seed=seed)
            if k
            else []
        )
    finally:
        if owned:
            engine.close()
    seconds = time.perf_counter() - start

    def scored(problem: Problem, gens) -> list[tuple[str, float]]:
        texts = [
            g.text
            if isinstance(g, _EpisodeDone)
            else tokenizer.decode(g.token_ids, skip_special_tokens=True)
            for g in gens
        ]
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
    if episodes is not None:
        report["greedy"]["tool_call_rate"] = _call_rate(greedy)
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
        if episodes is not None:
            report["avg_at_k"]["tool_call_rate"] = _call_rate(sampled)
    report["examples"] = examples
    report["seconds"] = seconds
    return report


class _EpisodeDone(NamedTuple):
    """One evaluated episode: the student's text, its trajectory's tokens, why it ended."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    tool_calls: int


def _episodes(generate, tokenizer, problems, prompt_ids, settings, max_model_len: int):
    """A ``generate`` whose completions are episodes (``rollout.episodes``): sample j of
    problem i runs as the samplers run it (``rollout.episodes.start_groups``)."""
    from rollout.episodes import run_episodes, start_groups

    def run(_prompt_ids, *, max_tokens: int, temperature: float, n: int, seed: int):
        runs = start_groups(settings, problems, prompt_ids, seed, n)
        for _ in run_episodes(
            generate,
            tokenizer,
            runs,
            settings,
            max_tokens=max_tokens,
            temperature=temperature,
            max_model_len=max_model_len,
        ):
            pass
        done = [
            _EpisodeDone(r.student_text(tokenizer), tuple(r.ids), r.finish, r.tool_calls)
            for r in runs
        ]
        return [done[i * n : (i + 1) * n] for i in range(len(problems))]

    return run


def _call_rate(results) -> float:
    """Fraction of the episodes in ``results`` (per problem, lists) with a tool call."""
    flat = [g for gens in results for g in gens]
    return sum(g.tool_calls > 0 for g in flat) / len(flat)


def prompt_only_summary(
    student_texts: Sequence[str],
    teacher_texts: Sequence[str],
    sample_logps: Sequence[Sequence[tuple[Sequence[float], Sequence[float]]]],
) -> dict[str, Any]:
    """The prompt-only figures (module docstring) from their inputs, per prompt i: the
    student's and the teacher's greedy texts, and ``sample_logps[i]``: one
    ``(log π_S, log π_T)`` pair of per-token lists per sample of prompt i (empty when k = 0).
    A prompt whose samples hold no token counts for agreement only."""
    n = len(student_texts)
    if n == 0 or len(teacher_texts) != n:
        raise ValueError(f"need one teacher text per student text, got {len(teacher_texts)}/{n}")
    agree = sum(s == t for s, t in zip(student_texts, teacher_texts, strict=True))
    out: dict[str, Any] = {
        "greedy_agreement": {
            "agreement": agree / n,
            "ci95": list(wilson_interval(agree, n)),
            "n_agree": agree,
        }
    }
    per_prompt, tokens = [], 0
    for samples in sample_logps:
        diffs = []
        for student, teacher in samples:
            if len(student) != len(teacher):
                raise ValueError(f"{len(student)} student but {len(teacher)} teacher log-probs")
            diffs.extend(s - t for s, t in zip(student, teacher, strict=True))
        if diffs:
            per_prompt.append(math.fsum(diffs) / len(diffs))
            tokens += len(diffs)
    if per_prompt:
        out["reverse_kl"] = {
            "estimate": statistics.fmean(per_prompt),
            "ci95": list(mean_interval(per_prompt, bounds=(-math.inf, math.inf))),
            "n_prompts": len(per_prompt),
            "tokens": tokens,
        }
    return out


def evaluate_prompt_only(
    model_dir: str | Path,
    problems: Sequence[Problem],
    *,
    engine,
    k: int = 4,
    max_tokens: int = 48,
    seed: int = 0,
    policy_version: int = 0,
) -> dict[str, Any]:
    """Prompt-only evaluation (module docstring) of the student ``engine`` serves;
    JSON-serialisable like ``evaluate``'s report.

    ``engine``: a ``services.rollout_service.RolloutService``: ``generate`` samples the student
    as served (its log-probs are the student's, at τ = 1), ``score`` has a teacher scorer score
    those samples, ``teacher_greedy`` gives the teacher's greedy answers (kept for the run).
    ``policy_version``: the version ``engine`` serves (recorded on the scored samples).
    """
    from transformers import AutoTokenizer

    if not problems:
        raise ValueError("evaluate_prompt_only needs at least one prompt")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    tokenizer = AutoTokenizer.from_pretrained(Path(model_dir))
    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in problems]
    start = time.perf_counter()
    greedy = engine.generate(prompt_ids, max_tokens=max_tokens, temperature=0.0, n=1, seed=seed)
    teacher = engine.teacher_greedy(prompt_ids, max_tokens=max_tokens)
    sampled = (
        engine.generate(prompt_ids, max_tokens=max_tokens, temperature=1.0, n=k, seed=seed)
        if k
        else [[] for _ in problems]
    )
    rollouts = [
        Rollout(
            sample_id=f"{p.id}/eval{j}",
            problem_id=p.id,
            answer="",
            prompt_ids=tuple(ids),
            response_ids=tuple(g.token_ids),
            logp_sampler=tuple(g.logprobs),
            policy_version=policy_version,
            finish_reason=g.finish_reason,
        )
        for p, ids, gens in zip(problems, prompt_ids, sampled, strict=True)
        for j, g in enumerate(gens)
        if g.token_ids
    ]
    scored = iter(engine.score(rollouts) if rollouts else [])
    sample_logps = [
        [(g.logprobs, next(scored).logp_teacher) for g in gens if g.token_ids] for gens in sampled
    ]
    seconds = time.perf_counter() - start

    def text(ids) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    student_texts = [text(g[0].token_ids) for g in greedy]
    teacher_texts = [text(ids) for ids in teacher]
    greedy_flat = [g[0] for g in greedy]
    return {
        "model": str(model_dir),
        "n_prompts": len(problems),
        "k": k,
        "max_tokens": max_tokens,
        "seed": seed,
        **prompt_only_summary(student_texts, teacher_texts, sample_logps),
        "greedy": {
            "temperature": 0.0,
            "truncated_fraction": sum(g.finish_reason == "length" for g in greedy_flat)
            / len(greedy_flat),
            "mean_tokens": statistics.fmean(len(g.token_ids) for g in greedy_flat),
        },
        "examples": [
            {
                "prompt": render_text(tokenizer, p.prompt),
                "student": s,
                "teacher": t,
                "agree": s == t,
            }
            for p, s, t in list(zip(problems, student_texts, teacher_texts, strict=True))[
                :N_EXAMPLES
            ]
        ],
        "seconds": seconds,
    }
