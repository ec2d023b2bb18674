"""``opdplus eval`` and the demo's teacher evaluation: a vLLM engine in this process."""

from __future__ import annotations

import json
from pathlib import Path


def resolve_model_arg(model: str) -> Path:
    """'toy-teacher' / 'toy-student' / 'smollm2-teacher' / 'smollm2-student' or a folder."""
    from services.models import resolve_pair

    if model in ("toy-teacher", "toy-student", "smollm2-teacher", "smollm2-student"):
        family, role = model.split("-")
        pair = resolve_pair(family, family)
        return getattr(pair, role)
    path = Path(model).expanduser()
    from rollout.checks import check_model_dir

    return check_model_dir(path, "evaluated")


def evaluate_model_dir(model_dir: Path, problems, *, k: int, max_tokens: int, dtype: str = "float32",
                       seed: int = 0, max_model_len: int = 256) -> dict:
    """Greedy accuracy and avg@k of the model in ``model_dir`` on ``problems``."""
    from transformers import AutoTokenizer

    from rollout.engine import EngineSettings, StudentEngine
    from rollout.evaluate import evaluate_with_engine

    engine = StudentEngine(EngineSettings(model_path=str(model_dir), dtype=dtype, seed=seed,
                                          max_model_len=max_model_len))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        result = evaluate_with_engine(engine, tokenizer, problems, k=k, max_tokens=max_tokens, seed=seed)
    finally:
        engine.close()
    result["model"] = str(model_dir)
    return result


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
    return evaluate_model_dir(model_dir, problems, k=args.k, max_tokens=args.max_tokens, dtype=args.dtype)
