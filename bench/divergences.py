"""OPD vs OPD+ across divergences on the toy pair: the paper's central result in miniature.

For each divergence and estimator, trains the toy student from the same start with the same
prompts and settings, and reports held-out greedy accuracy and avg@k after training, the
per-token divergence at the start and end, and the mean gradient norm. Expected shape (paper
§7, miniature): OPD+ trains under every divergence; stop-gradient OPD degrades the non-KL
ones (forward KL, JS); reverse KL is the same under both (after centring, identical).

    python bench/divergences.py [--steps 80] [--divergences reverse_kl,forward_kl,js]

Writes bench/results/divergences-<timestamp>.json and divergences-latest.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import save

REPO = Path(__file__).resolve().parent.parent


def run_one(divergence: str, estimator: str, steps: int, out_dir: Path) -> dict:
    from services.config import load_config
    from services.driver import train

    name = f"{divergence}-{estimator}"
    cfg = load_config(
        REPO / "deploy/configs/demo.toml",
        [
            f'run.name="{name}"',
            f'run.out_dir="{out_dir}"',
            f"run.steps={steps}",
            f"run.checkpoint_every={steps}",
            f"distill.divergence={divergence}",
            f"distill.estimator={estimator}",
            "eval.every=0",
            "log.progress=false",
            "log.plots=false",
            "log.tensorboard=false",
            "ray.dashboard=false",
        ],
    )
    t0 = time.perf_counter()
    summary = train(cfg, progress=False)
    rows = [
        json.loads(x) for x in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    steps_rows = [r for r in rows if "learner/loss" in r]
    return {
        "divergence": divergence,
        "estimator": estimator,
        "steps": steps,
        "acc_before": summary.eval_before["greedy_acc"],
        "acc_after": summary.eval_after["greedy_acc"],
        "acc_after_ci": summary.eval_after["greedy_ci"],
        "avg_at_k_after": summary.eval_after.get("avg_at_k"),
        "divergence_first": summary.divergence_first,
        "divergence_last": summary.divergence_last,
        "grad_norm_mean": statistics.fmean(r["learner/grad_norm"] for r in steps_rows),
        "response_len_last": statistics.fmean(
            r["rollout/response_len_mean"] for r in steps_rows[-5:]
        ),
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    # bench/ is first on sys.path (a bench script would shadow a package): repository first.
    sys.path.insert(0, str(REPO))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--divergences", default="reverse_kl,forward_kl,js")
    p.add_argument("--estimators", default="opd_plus,opd")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for div in args.divergences.split(","):
            for est in args.estimators.split(","):
                r = run_one(div, est, args.steps, Path(tmp))
                results.append(r)
                print(
                    f"{div:11} {est:9} acc {r['acc_before']:.3f} → {r['acc_after']:.3f} "
                    f"[{r['acc_after_ci'][0]:.3f}, {r['acc_after_ci'][1]:.3f}]  "
                    f"div {r['divergence_first']:.4f} → {r['divergence_last']:.4f}  "
                    f"|g| {r['grad_norm_mean']:.2f}  len {r['response_len_last']:.1f}  "
                    f"({r['wall_s']:.0f} s)",
                    flush=True,
                )
    payload = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    save(payload, REPO / "bench" / "results", "divergences")


if __name__ == "__main__":
    main()
