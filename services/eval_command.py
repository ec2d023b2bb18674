"""``opdplus eval`` and the demo's teacher evaluation: a vLLM engine in this process."""

from __future__ import annotations

import json
from pathlib import Path

from services.errors import UserError

BUILT_IN_MODELS = tuple(
    f"{family}-{role}"
    for family in ("toy", "toy_tool", "smollm2")
    for role in ("teacher", "student")
)


def resolve_model_arg(model: str) -> Path:
    """'toy-teacher' / 'toy-student' / 'toy_tool-teacher' / 'toy_tool-student' (the calculator
    tool pair) / 'smollm2-teacher' / 'smollm2-student' or a folder."""
    from models.pairs import resolve_pair

    if model in BUILT_IN_MODELS:
        family, role = model.split("-")
        pair = resolve_pair(family, family)
        return getattr(pair, role)
    path = Path(model).expanduser()
    from models.checks import check_model_dir

    return check_model_dir(path, "evaluated")


def flatten_eval(report: dict) -> dict:
    """rollout.accuracy's report → the flat summary the driver logs and the demo prints."""
    if "greedy_agreement" in report:  # evaluate_prompt_only's
        return flatten_prompt_only(report)
    out = {
        "n_problems": report["n_problems"],
        "k": report["k"],
        "greedy_acc": report["greedy"]["accuracy"],
        "greedy_ci": report["greedy"]["ci95"],
        "greedy_truncated_frac": report["greedy"]["truncated_fraction"],
    }
    if "avg_at_k" in report:
        out["avg_at_k"] = report["avg_at_k"]["accuracy"]
        out["avg_at_k_ci"] = report["avg_at_k"]["ci95"]
        out["pass_at_k"] = report["pass_at_k"]
    for part in ("greedy", "avg_at_k"):  # episodes (task.environment) only
        if "tool_call_rate" in report.get(part, {}):
            out[f"{part}_tool_call_rate"] = report[part]["tool_call_rate"]
    out["examples"] = report.get("examples", [])[:3]
    return out


def flatten_prompt_only(report: dict) -> dict:
    """rollout.accuracy.evaluate_prompt_only's report → flat keys (``eval/<key>`` in
    metrics.jsonl): greedy_agreement (+ _ci), sampled_reverse_kl (+ _ci; absent when
    eval.samples = 0), n_prompts; n_problems stays 0 (no verifier accuracy)."""
    agreement = report["greedy_agreement"]
    out = {
        "n_problems": 0,
        "n_prompts": report["n_prompts"],
        "k": report["k"],
        "greedy_agreement": agreement["agreement"],
        "greedy_agreement_ci": agreement["ci95"],
        "greedy_truncated_frac": report["greedy"]["truncated_fraction"],
    }
    if "reverse_kl" in report:
        out["sampled_reverse_kl"] = report["reverse_kl"]["estimate"]
        out["sampled_reverse_kl_ci"] = report["reverse_kl"]["ci95"]
        out["sampled_tokens"] = report["reverse_kl"]["tokens"]
    out["examples"] = report.get("examples", [])[:3]
    return out


def held_out_prompts(source) -> list:
    """The held-out prompts of a source whose evaluation set has no answers (a prompt-only
    chat dataset): its ``eval_prompts()``, less those over the run's token limit when
    ``source`` is the run's ``rollout.sources.TokenLimitedSource``; [] for a source without
    ``eval_prompts``."""
    from rollout.sources import TokenLimitedSource

    limited = source if isinstance(source, TokenLimitedSource) else None
    prompts = getattr(limited.source if limited else source, "eval_prompts", None)
    if prompts is None:
        return []
    if limited is None:
        return prompts()
    return [p for p in prompts() if len(limited.encode(p.prompt)) <= limited.max_eval_tokens]


def prompt_only_lines(before: dict | None, after: dict | None) -> list[str]:
    """The console's closing lines for a prompt-only evaluation, before → after with their
    95 % intervals; [] when neither is one."""
    if not any(r and "greedy_agreement" in r for r in (before, after)):
        return []

    def figure(result: dict | None, key: str, fmt: str) -> str:
        if not result or key not in result:
            return "n/a"
        lo, hi = result[f"{key}_ci"]
        return f"{result[key]:{fmt}} [95% CI {lo:{fmt}}–{hi:{fmt}}]"

    n = (after or before)["n_prompts"]
    return [
        f"[opdplus] held-out prompts without answers ({n}): the student against the teacher",
        "  greedy agreement with the teacher  "
        + " → ".join(figure(r, "greedy_agreement", ".3f") for r in (before, after)),
        "  reverse KL of its samples, per token  "
        + " → ".join(figure(r, "sampled_reverse_kl", ".4f") for r in (before, after)),
    ]


def evaluate_model_dir(
    model_dir: Path,
    problems,
    *,
    k: int,
    max_tokens: int,
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int = 256,
    episodes=None,
) -> dict:
    """Greedy accuracy and avg@k of the model in ``model_dir`` (a vLLM engine in this process);
    ``episodes`` (a ``rollout.episodes.EpisodeSettings``): every completion an episode with its
    environment, as the run's own evaluation, and the tool-call rates."""
    from rollout.accuracy import evaluate
    from rollout.engine import EngineSettings, StudentEngine

    def factory(path):
        return StudentEngine(
            EngineSettings(
                model_path=str(path), dtype=dtype, seed=seed, max_model_len=max_model_len
            )
        )

    report = evaluate(
        model_dir,
        problems,
        engine_factory=factory,
        k=k,
        max_tokens=max_tokens,
        seed=seed,
        episodes=episodes,
        max_model_len=max_model_len,
    )
    return {**flatten_eval(report), "model": str(model_dir), "full_report": report}


def cached_teacher_eval(model_dir: Path, problems, *, k: int, max_tokens: int) -> dict:
    """The teacher never changes during a run: evaluate it once per model folder and task."""
    key = f"eval-{len(problems)}-{k}-{max_tokens}-{problems[0].id if problems else ''}.json"
    path = Path(model_dir) / key
    if path.exists():
        return json.loads(path.read_text())
    result = evaluate_model_dir(model_dir, problems, k=k, max_tokens=max_tokens)
    path.write_text(json.dumps(result, indent=2))
    return result


class EvalArgsError(UserError, ValueError):
    """``opdplus eval``'s flags do not fit together; the message names the flags."""


def eval_episodes(args, seed: int = 0):
    """The ``rollout.episodes.EpisodeSettings`` of ``opdplus eval --environment ...`` (as
    ``services.parts.episode_settings`` builds a run's from task.environment and rollout.*);
    None without --environment."""
    if not args.environment:
        if args.environment_system:
            raise EvalArgsError("--environment-system: only an episode reads it; set --environment")
        return None
    if not 0 < args.max_episode_tokens < args.max_model_len:
        raise EvalArgsError(
            f"--max-episode-tokens must be in [1, --max-model-len ({args.max_model_len})), "
            f"got {args.max_episode_tokens}"
        )
    if args.max_turns < 1:
        raise EvalArgsError(f"--max-turns must be >= 1, got {args.max_turns}")
    from rollout.environments import EnvironmentOptions
    from rollout.episodes import EpisodeSettings

    return EpisodeSettings(
        environment=args.environment,
        options=EnvironmentOptions(seed=seed, system=args.environment_system or None),
        max_turns=args.max_turns,
        max_episode_tokens=args.max_episode_tokens,
    )


def eval_command(args) -> dict:
    from rollout.sources import make_source

    episodes = eval_episodes(args)  # flags checked before a model is built or an engine starts
    model_dir = resolve_model_arg(args.model)
    source = make_source(args.task, path=args.path, task=args.name, eval_path=args.eval_path)
    problems = source.eval_set()[: args.n]
    return evaluate_model_dir(
        model_dir,
        problems,
        k=args.k,
        max_tokens=args.max_tokens,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        episodes=episodes,
    )
