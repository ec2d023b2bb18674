"""The results table: estimator x divergence x seed on the toy pair, plus the discount γ.

Every arm trains the toy student from the same start on the demo configuration
(`deploy/configs/demo.toml` pinned at 32 prompts x 4 samples per step, lr 1e-4, one step of staleness)
with only the arm's keys changed, and is judged on the same 200 held-out problems (greedy and
avg@4) at fixed steps. Arms: estimator in {OPD, OPD+, OPD+ top-K} x divergence in {reverse KL,
forward KL, JS, Hellinger, TV, alpha = 0.5} at γ = 0, plus γ = 1 for OPD+ and OPD+ top-K on
reverse KL and JS; each for every seed. One JSON line per finished arm is appended to the
sweep file, so an interrupted sweep resumes where it stopped (finished arms are skipped).

    python bench/divergences.py run [--steps 50] [--seeds 0,1,2] [--sweep FILE]
    python bench/divergences.py render [--sweep FILE] [--peer FILE] [--out docs/RESULTS.md]
    python bench/divergences.py run --steps 2 --seeds 0 --arms js/opd_plus   # smoke test

`render` writes the table (means over seeds, the seeds' range, pooled intervals) and, when a
`bench/peer_trl.py` report is given, TRL's row at the same steps.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from common import REPO, RESULTS, prepare_process

SWEEP = RESULTS / "sweep.jsonl"
TOPK = 8  # of the toy vocabulary's 20 tokens: a real top-K, not the whole distribution

ESTIMATORS = {
    "opd": ("OPD (stop-gradient)", ["distill.estimator=opd", "distill.teacher_topk=0"]),
    "opd_plus": ("OPD+", ["distill.estimator=opd_plus", "distill.teacher_topk=0"]),
    "opd_plus_topk": (
        f"OPD+ top-{TOPK}",
        ["distill.estimator=opd_plus", f"distill.teacher_topk={TOPK}"],
    ),
}
DIVERGENCES = {
    "reverse_kl": ("reverse KL", ["distill.divergence=reverse_kl"]),
    "forward_kl": ("forward KL", ["distill.divergence=forward_kl"]),
    "js": ("JS", ["distill.divergence=js"]),
    "hellinger": ("Hellinger", ["distill.divergence=hellinger"]),
    "tv": ("TV", ["distill.divergence=tv"]),
    "alpha0.5": ("α = 0.5", ["distill.divergence=alpha", "distill.alpha=0.5"]),
}
GAMMA_ARMS = [(d, e) for d in ("reverse_kl", "js") for e in ("opd_plus", "opd_plus_topk")]


def arms(gammas: bool = True) -> list[tuple[str, str, float]]:
    """(divergence, estimator, γ) of every arm, in table order."""
    grid = [(d, e, 0.0) for d in DIVERGENCES for e in ESTIMATORS]
    return grid + ([(d, e, 1.0) for d, e in GAMMA_ARMS] if gammas else [])


def arm_key(divergence: str, estimator: str, gamma: float, seed: int) -> str:
    return f"{divergence}/{estimator}/g{gamma:g}/s{seed}"


def overrides(divergence: str, estimator: str, gamma: float, seed: int, steps: int) -> list[str]:
    every = max(1, steps // 2)
    return [
        *DIVERGENCES[divergence][1],
        *ESTIMATORS[estimator][1],
        f"distill.discount={gamma}",
        f"run.seed={seed}",
        f"run.steps={steps}",
        f"run.checkpoint_every={steps}",
        f"eval.every={every}",
        # docs/RESULTS.md was measured at 32 prompts x 4 samples (the demo's former layout; it
        # now deals 128 x 1): pinned so the table's rows stay comparable when re-run.
        "rollout.prompts_per_step=32",
        "rollout.samples_per_prompt=4",
        "log.progress=false",
        "log.plots=false",
        "log.tensorboard=false",
        "ray.dashboard=false",
    ]


def run_arm(
    divergence: str,
    estimator: str,
    gamma: float,
    seed: int,
    steps: int,
    out: Path,
    extra: tuple[str, ...] = (),
) -> dict:
    """Train one arm; returns its record (the per-step and evaluation figures it is judged on)."""
    from services.config import load_config
    from services.driver import train
    from services.metrics import read_metrics

    key = arm_key(divergence, estimator, gamma, seed)
    name = key.replace("/", "-").replace(".", "_")
    sets = [f'run.name="{name}"', f'run.out_dir="{out}"']
    sets += overrides(divergence, estimator, gamma, seed, steps) + list(extra)
    cfg = load_config(REPO / "deploy/configs/demo.toml", sets)
    t0 = time.perf_counter()
    summary = train(cfg, progress=False)
    rows = read_metrics(Path(summary.run_dir) / "metrics.jsonl")
    train_rows = [r for r in rows if "learner/loss" in r]
    evals = [
        {
            "step": r["step"],
            "n": int(r["eval/n_problems"]),
            "greedy": r["eval/greedy_acc"],
            "avg_at_k": r["eval/avg_at_k"],
            "k": int(r["eval/k"]),
        }
        for r in rows
        if "eval/greedy_acc" in r
    ]
    return {
        "key": key,
        "divergence": divergence,
        "estimator": estimator,
        "gamma": gamma,
        "seed": seed,
        "steps": steps,
        "evals": evals,
        "divergence_first": summary.divergence_first,
        "divergence_last": summary.divergence_last,
        "grad_norm_mean": statistics.fmean(r["learner/grad_norm"] for r in train_rows),
        "response_len_last": statistics.fmean(
            r["rollout/response_len_mean"] for r in train_rows[-5:]
        ),
        "max_tokens": cfg.rollout.max_tokens,
        "train_wall_s": sum(r.get("time/step", 0.0) for r in train_rows),
        "wall_s": time.perf_counter() - t0,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def read_sweep(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{i}: not a JSON record ({exc})") from None
    return out


def cmd_run(args: argparse.Namespace) -> None:
    import tempfile

    from services.cluster import ray_session

    todo = [
        (d, e, g, s)
        for s in args.seeds  # seed-major: a sweep cut short still covers every arm once
        for d, e, g in arms(not args.no_gamma)
        if not args.arms or f"{d}/{e}" in args.arms or f"{d}/{e}/g{g:g}" in args.arms
    ]
    done = {r["key"] for r in read_sweep(args.sweep) if r["steps"] == args.steps}
    todo = [a for a in todo if arm_key(*a) not in done]
    print(f"{len(todo)} arms to run ({len(done)} already in {args.sweep})", flush=True)
    args.sweep.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=2, dashboard=False):
        for i, (d, e, g, s) in enumerate(todo, 1):
            rec = run_arm(d, e, g, s, args.steps, Path(tmp), tuple(args.set))
            with args.sweep.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            last = rec["evals"][-1]
            print(
                f"[{i}/{len(todo)}] {rec['key']:32} greedy {rec['evals'][0]['greedy']:.3f} → "
                f"{last['greedy']:.3f}  avg@{last['k']} {last['avg_at_k']:.3f}  "
                f"div {rec['divergence_first']:.4f} → {rec['divergence_last']:.4f}  "
                f"({rec['wall_s']:.0f} s)",
                flush=True,
            )


# ---------------------------------------------------------------------------------- render


def _pooled(evals: list[dict], field: str) -> tuple[float, float, float]:
    """Mean over seeds and a 95% interval: Wilson on the pooled greedy successes; for avg@k
    the normal interval of the per-problem mean (problems x seeds), from its binomial bound."""
    from rollout.accuracy import Z95, wilson_interval

    n = sum(e["n"] for e in evals)
    if field == "greedy":
        hits = round(sum(e["greedy"] * e["n"] for e in evals))
        lo, hi = wilson_interval(hits, n)
        return hits / n, lo, hi
    # avg@k: k samples per problem; an upper bound on its variance is p(1-p)/n per problem.
    p = sum(e["avg_at_k"] * e["n"] for e in evals) / n
    half = Z95 * math.sqrt(max(p * (1 - p), 1e-12) / n)
    return p, max(0.0, p - half), min(1.0, p + half)


def collapsed(rec: dict) -> bool:
    """Training made the student worse than it started or its divergence ran away: greedy
    accuracy fell by more than 0.1, the per-token divergence more than doubled, or the
    responses ran to the length limit."""
    first, last = rec["evals"][0]["greedy"], rec["evals"][-1]["greedy"]
    return (
        last < first - 0.1
        or rec["divergence_last"] > 2 * rec["divergence_first"]
        or rec["response_len_last"] >= rec["max_tokens"] - 0.5
    )


def summarise(records: list[dict]) -> list[dict]:
    """One row per (divergence, estimator, γ): figures averaged over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["divergence"], r["estimator"], r["gamma"], r["steps"]), []).append(r)
    order = {a: i for i, a in enumerate(arms())}
    rows = []
    for (d, e, g, steps), recs in sorted(
        groups.items(), key=lambda kv: (kv[0][3], order.get(kv[0][:3], 99))
    ):
        eval_steps = sorted({ev["step"] for ev in recs[0]["evals"]})
        at = {}
        for s in eval_steps:
            evs = [ev for r in recs for ev in r["evals"] if ev["step"] == s]
            at[s] = {
                "greedy": _pooled(evs, "greedy"),
                "avg_at_k": _pooled(evs, "avg_at_k"),
                "seed_range": (min(ev["greedy"] for ev in evs), max(ev["greedy"] for ev in evs)),
            }
        rows.append(
            {
                "divergence": d,
                "estimator": e,
                "gamma": g,
                "steps": steps,
                "seeds": sorted(r["seed"] for r in recs),
                "at": at,
                "divergence_first": statistics.fmean(r["divergence_first"] for r in recs),
                "divergence_last": statistics.fmean(r["divergence_last"] for r in recs),
                "grad_norm_mean": statistics.fmean(r["grad_norm_mean"] for r in recs),
                "response_len_last": statistics.fmean(r["response_len_last"] for r in recs),
                "collapsed": sum(collapsed(r) for r in recs),
                "train_wall_s": statistics.fmean(r["train_wall_s"] for r in recs),
            }
        )
    return rows


def _ci(t: tuple[float, float, float]) -> str:
    return f"{t[0]:.3f} [{t[1]:.2f}, {t[2]:.2f}]"


def peer_row(peer: dict, steps: list[int]) -> list[str] | None:
    """TRL's greedy / avg@k at ``steps`` from a bench/peer_trl.py report (its own checkpoints)."""
    curve = peer.get("figures", {}).get("trl", {}).get("curve")
    if not curve:
        return None
    by_step = {c["step"]: c for c in curve}
    cells = []
    for s in steps:
        c = by_step.get(s)
        if not c or "greedy_acc" not in c:
            cells.append("—")
            continue
        g, (lo, hi) = c["greedy_acc"], c.get("greedy_ci", (float("nan"), float("nan")))
        cells.append(f"{g:.3f} [{lo:.2f}, {hi:.2f}] / {c.get('avg_at_k', float('nan')):.3f}")
    return cells


def render(records: list[dict], peer: dict | None, steps: int, command: str) -> str:
    rows = [r for r in summarise(records) if r["steps"] == steps]
    if not rows:
        raise SystemExit(f"no sweep records with {steps} steps")
    eval_steps = sorted(rows[0]["at"])
    seeds = sorted({s for r in rows for s in r["seeds"]})
    out = [
        "## The table: OPD, OPD+ and OPD+ top-K across divergences",
        "",
        f"Generated by `{command}` from `bench/results/sweep.jsonl` (one line per trained arm);",
        "regenerate the records with `python bench/divergences.py run --steps "
        f"{steps} --seeds {','.join(map(str, seeds))}` (resumable: finished arms are skipped).",
        "",
        "**Setting.** Toy pair (`opdplus toy-models`), arithmetic task, the demo configuration",
        "(`deploy/configs/demo.toml` at 32 prompts × 4 samples per step — `bench/divergences.py`",
        "pins that layout; the demo itself now deals 128 × 1, README — AdamW lr 1e-4, clip 1.0,",
        "40 completion tokens, one step of staleness, 1 sampler + 1 scorer + 1 learner rank on 2",
        f"CPU cores), {steps} steps per arm, only the arm's keys changed. OPD+ top-K uses the",
        f"teacher's top-{TOPK} of the 20-token vocabulary plus one tail bucket "
        "(`distill.teacher_topk`).",
        "γ is `distill.discount` (0 = per-token costs, 1 = the sequence objective).",
        "",
        "**Columns.** Held-out greedy accuracy / avg@4 on 200 problems at each evaluated step:",
        "the mean over seeds with a 95% interval from the pooled evaluations (Wilson for greedy),",
        "then the seeds' greedy range at the last step. `div` is the per-token divergence the",
        "learner reports, mean of the first and of the last 5 steps (top-K arms: D̃ over the",
        "top-K plus tail, a lower bound of the sampled arms' quantity, so compare it within a",
        "row's estimator). `|g|` is the mean gradient norm before clipping, `len` the mean",
        "response length over the last 5 steps, `collapse` how many seeds ended worse than they",
        "started (greedy −0.1), with the divergence doubled, or at the length limit.",
        "",
    ]
    head = (
        "| divergence | estimator | γ | seeds | "
        + " | ".join(f"step {s}: greedy / avg@4" for s in eval_steps)
        + f" | seeds' greedy at {eval_steps[-1]} | div first → last | \\|g\\| | len | collapse |"
    )
    out += [head, "|" + "---|" * (5 + len(eval_steps) + 4)]
    for r in rows:
        cells = [
            DIVERGENCES[r["divergence"]][0],
            ESTIMATORS[r["estimator"]][0],
            f"{r['gamma']:g}",
            str(len(r["seeds"])),
        ]
        for s in eval_steps:
            a = r["at"][s]
            cells.append(f"{_ci(a['greedy'])} / {a['avg_at_k'][0]:.3f}")
        lo, hi = r["at"][eval_steps[-1]]["seed_range"]
        cells += [
            f"{lo:.3f}–{hi:.3f}",
            f"{r['divergence_first']:.4f} → {r['divergence_last']:.4f}",
            f"{r['grad_norm_mean']:.2f}",
            f"{r['response_len_last']:.1f}",
            f"{r['collapsed']}/{len(r['seeds'])}" if r["collapsed"] else "no",
        ]
        out.append("| " + " | ".join(cells) + " |")
    if peer is not None:
        cells = peer_row(peer, eval_steps)
        if cells:
            out += [
                "",
                "**TRL** (`bench/peer_trl.py`, TRL 1.16 `DistillationTrainer`, full-vocabulary "
                "generalized JSD β = 0.5, same pair, prompts, batch, lr, clip and length; one "
                f"seed; report of {peer.get('meta', {}).get('finished', 'unknown date')}):",
                "",
                "| | " + " | ".join(f"step {s}: greedy / avg@4" for s in eval_steps) + " |",
                "|---|" + "---|" * len(eval_steps),
                f"| TRL JSD, {peer['runs']['trl'].get('torch_threads', '?')} threads | "
                + " | ".join(cells)
                + " |",
            ]
    return "\n".join(out) + "\n"


def cmd_render(args: argparse.Namespace) -> None:
    records = read_sweep(args.sweep)
    if not records:
        raise SystemExit(f"{args.sweep}: no sweep records (run `python bench/divergences.py run`)")
    steps = args.steps or max(r["steps"] for r in records)
    peer = json.loads(args.peer.read_text()) if args.peer and args.peer.exists() else None
    text = render(records, peer, steps, "python bench/divergences.py render")
    if args.out:
        head = args.out.read_text().split(MARK)[0] if args.out.exists() else ""
        args.out.write_text(head + MARK + "\n\n" + text if head else text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)


MARK = "<!-- generated below by bench/divergences.py render -->"


def main(argv: list[str] | None = None) -> None:
    prepare_process()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train the arms not yet in the sweep file")
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    r.add_argument("--arms", type=lambda s: s.split(","), default=[], help="e.g. js/opd_plus")
    r.add_argument("--no-gamma", action="store_true", help="skip the γ = 1 arms")
    r.add_argument("--sweep", type=Path, default=SWEEP)
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every arm (e.g. models.student=PATH; tests use it)",
    )
    q = sub.add_parser("render", help="write the results table from the sweep file")
    q.add_argument("--sweep", type=Path, default=SWEEP)
    q.add_argument("--steps", type=int, default=0, help="which sweep length (default: longest)")
    q.add_argument("--peer", type=Path, default=RESULTS / "peer_trl-latest.json")
    q.add_argument("--out", type=Path, default=None, help="e.g. docs/RESULTS.md")
    args = p.parse_args(argv)
    if args.cmd == "run":
        unknown = [a for a in args.arms if a.split("/")[0] not in DIVERGENCES]
        if unknown:
            p.error(f"--arms: unknown divergence in {unknown}; known: {', '.join(DIVERGENCES)}")
        cmd_run(args)
    else:
        cmd_render(args)


if __name__ == "__main__":
    main()
