"""``opdplus eval`` and the demo's teacher evaluation: a vLLM engine in this process."""

from __future__ import annotations

import json
from pathlib import Path


def resolve_model_arg(model: str) -> Path:
    """'toy-teacher' / 'toy-student' / 'smollm2-teacher' / 'smollm2-student' or a folder."""
    from models.pairs import resolve_pair

    if model in ("toy-teacher", "toy-student", "smollm2-teacher", "smollm2-student"):
        family, role = model.split("-")
        pair = resolve_pair(family, family)
        return getattr(pair, role)
    path = Path(model).expanduser()
    from models.checks import check_model_dir

    return check_model_dir(path, "evaluated")


def flatten_eval(report: dict) -> dict:
    """rollout.accuracy's report → the flat summary the driver logs and the demo prints."""
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
    out["examples"] = report.get("examples", [])[:3]
    return out


def evaluate_model_dir(
    model_dir: Path,
    problems,
    *,
    k: int,
    max_tokens: int,
    dtype: str = "float32",
    seed: int = 0,
    max_model_len: int = 256,
) -> dict:
    """Greedy accuracy and avg@k of the model in ``model_dir`` (a vLLM engine in this process)."""
    from rollout.accuracy import evaluate
    from rollout.engine import EngineSettings, StudentEngine

    def factory(path):
        return StudentEngine(
            EngineSettings(
                model_path=str(path), dtype=dtype, seed=seed, max_model_len=max_model_len
            )
        )

    report = evaluate(
        model_dir, problems, engine_factory=factory, k=k, max_tokens=max_tokens, seed=seed
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


def eval_command(args) -> dict:
    from rollout.sources import make_source

    model_dir = resolve_model_arg(args.model)
    source = make_source(args.task, path=args.path, task=args.name)
    problems = source.eval_set()[: args.n]
    return evaluate_model_dir(
        model_dir, problems, k=args.k, max_tokens=args.max_tokens, dtype=args.dtype
    )
