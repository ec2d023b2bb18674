"""Judging the checkpoints: ``services.eval_command.evaluate_model_dir`` (what ``opdplus eval``
runs) on the config's held-out problems, greedy and avg@k, in a child process."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, prepare_process


def eval_problems(cfg) -> list:
    from services.parts import build_source

    return build_source(cfg).eval_set()[: cfg.task.eval_size]


def evaluate_dirs(dirs: list[Path], cfg) -> list[dict]:
    """``evaluate_dir`` of each folder, in a child process: an in-process vLLM CPU engine
    pins this process's OpenMP threads and sets variables (``LD_PRELOAD``,
    ``LOCAL_WORLD_SIZE``) that the Ray workers of a later opdplus run would inherit."""
    import subprocess

    from services.config import to_toml

    with tempfile.TemporaryDirectory(prefix="peer_trl-eval-") as tmp:
        spec, result = Path(tmp) / "config.toml", Path(tmp) / "result.json"
        spec.write_text(to_toml(cfg))
        code = (
            "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
            "from peer.evaluate import eval_worker; eval_worker(*sys.argv[3:])"
        )
        argv = [sys.executable, "-c", code, str(REPO), str(Path(__file__).parents[1])]
        subprocess.run([*argv, str(spec), str(result), *map(str, dirs)], check=True)
        return json.loads(result.read_text())


def eval_worker(config_path: str, result_path: str, *dirs: str) -> None:
    """The child of ``evaluate_dirs``: load the config, evaluate each folder, write JSON."""
    from services.config import load_config

    prepare_process()
    cfg = load_config(config_path)
    problems = eval_problems(cfg)
    results = [evaluate_dir(Path(d), problems, cfg) for d in dirs]
    Path(result_path).write_text(json.dumps(results))


def evaluate_dir(model_dir: Path, problems: list, cfg) -> dict:
    """``opdplus eval``'s evaluation of one folder: greedy and avg@k with their 95 % CIs."""
    from services.eval_command import evaluate_model_dir

    t0 = time.perf_counter()
    result = evaluate_model_dir(
        model_dir, problems, k=cfg.eval.samples, max_tokens=cfg.eval.max_tokens, dtype="float32"
    )
    return {
        "greedy_acc": result["greedy_acc"],
        "greedy_ci": result["greedy_ci"],
        "avg_at_k": result.get("avg_at_k"),
        "avg_at_k_ci": result.get("avg_at_k_ci"),
        "eval_s": time.perf_counter() - t0,
    }
