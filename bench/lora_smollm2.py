"""LoRA vs full fine-tuning on the SmolLM2 pair: the README's 48-step run
(`deploy/configs/smollm2.toml`), once training every weight (the baseline) and once training
rank-R adapters on every linear layer but the output layer (`learner.lora`, alpha = 2R as in
`bench/learner.py --lora`), everything else the same config.

Each arm is one `opdplus train` process, run while this script holds the heavy lock
(/tmp/opdplus-heavy.lock, flock), one arm at a time: its wall time does not include waiting
for the lock. Per arm:

* held-out greedy accuracy and avg@4 (200 problems, Wilson / normal 95 % intervals) before and
  after, from the run's summary.json, and at steps 16 / 32 from metrics.jsonl;
* the learner's peak memory: the largest VmHWM (peak RSS) of the run's LearnerRank process
  (a descendant of the `opdplus train` process), polled every second while the run lives;
* wall time of the `opdplus train` process, and the run's own wall_s (summary.json).

Ratios are LoRA / full. Run from the repository root::

    .venv/bin/python bench/lora_smollm2.py                       # both arms, ~40 min on 2 cores
    .venv/bin/python bench/lora_smollm2.py --arms lora           # the LoRA arm only
    .venv/bin/python bench/lora_smollm2.py --steps 2 --arms lora # smoke test

Results: a table on stdout, ``<out>/lora_smollm2-<timestamp>.json`` and ``-latest.json``; the
runs under ``runs/smollm2-<arm>-<timestamp>``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import threading
import time
from pathlib import Path

from common import REPO, RESULTS, cpu_state, machine_info, print_table, save

NAME = "lora_smollm2"
CONFIG = "deploy/configs/smollm2.toml"
LOCK = "/tmp/opdplus-heavy.lock"


def arm_sets(arm: str, rank: int) -> list[str]:
    if arm == "full":
        return []
    return [f"learner.lora.rank={rank}", f"learner.lora.alpha={2.0 * rank}"]


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _descendants(root: int) -> list[int]:
    kids, out, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def _peak_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class LearnerPeak(threading.Thread):
    """Polls the LearnerRank processes under `root` and keeps their largest VmHWM (KiB)."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak_kib, self.pids = root, 0, set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            for pid in _descendants(self.root):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                if cmd.startswith("ray::LearnerRank"):
                    self.pids.add(pid)
                    self.peak_kib = max(self.peak_kib, _peak_kib(pid) or 0)


def _evals(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/greedy_acc" in row:
            out[row["step"]] = {"greedy": row["eval/greedy_acc"], "avg_at_k": row["eval/avg_at_k"]}
    return out


def run_arm(arm: str, sets: list[str], steps: int, stamp: str) -> dict:
    name = f"smollm2-{arm}-{stamp}"
    cmd = [
        str(REPO / ".venv" / "bin" / "opdplus"),
        "train",
        "--config",
        CONFIG,
        "--set",
        f'run.name="{name}"',
        "--set",
        f"run.steps={steps}",
    ]
    for s in sets:
        cmd += ["--set", s]
    with open(LOCK, "w") as lock:
        t_wait = time.perf_counter()
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for this run only
        waited = time.perf_counter() - t_wait
        print(f"[{arm}] lock after {waited:.0f} s: {' '.join(cmd)}", flush=True)
        load_start = cpu_state()["load_avg_1min"]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO)
        watch = LearnerPeak(proc.pid)
        watch.start()
        code = proc.wait()
        wall = time.perf_counter() - t0
        watch.done.set()
        watch.join()
        load_end = cpu_state()["load_avg_1min"]
    if code != 0:
        raise RuntimeError(f"arm {arm}: opdplus train exited {code}")
    run_dir = REPO / "runs" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    before, after = summary["eval_before"], summary["eval_after"]
    return {
        "arm": arm,
        "command": " ".join(cmd[1:]),
        "sets": sets,
        "run_dir": str(run_dir),
        "lock_wait_s": waited,
        "wall_s": wall,
        "run_wall_s": summary["wall_s"],
        "learner_peak_rss_mib": watch.peak_kib / 1024,
        "learner_pids": sorted(watch.pids),
        "before": {k: before[k] for k in ("greedy_acc", "greedy_ci", "avg_at_k", "avg_at_k_ci")},
        "after": {k: after[k] for k in ("greedy_acc", "greedy_ci", "avg_at_k", "avg_at_k_ci")},
        "evals": _evals(run_dir),
        "load_avg_1min_start_end": [load_start, load_end],
    }


def table(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    for arm, fig in report["arms"].items():
        a = fig["after"]
        lo, hi = a["greedy_ci"]
        rows += [
            (
                f"{arm}: greedy before -> after",
                f"{fig['before']['greedy_acc']:.3f} -> {a['greedy_acc']:.3f} [{lo:.3f}-{hi:.3f}]",
                "",
            ),
            (f"{arm}: avg@4 after", f"{a['avg_at_k']:.3f}", ""),
            (f"{arm}: learner peak RSS", f"{fig['learner_peak_rss_mib']:,.0f} MiB", ""),
            (f"{arm}: wall", f"{fig['wall_s']:.0f} s", ""),
        ]
    for key, value in report.get("ratios", {}).items():
        rows.append((key, f"{value:.2f}", "LoRA / full"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha = 2 x rank)")
    parser.add_argument("--steps", type=int, default=48, help="run.steps of each arm")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"folder for {NAME}-*.json")
    args = parser.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {**machine_info(), "config": CONFIG, "rank": args.rank, "steps": args.steps}
    report = {"meta": {**meta, "cpu_at_start": cpu_state()}, "arms": {}}
    for arm in args.arms.split(","):
        report["arms"][arm] = run_arm(arm, arm_sets(arm, args.rank), args.steps, stamp)
    arms = report["arms"]
    if {"lora", "full"} <= arms.keys():
        lora, full = arms["lora"], arms["full"]
        report["ratios"] = {
            "learner peak RSS": lora["learner_peak_rss_mib"] / full["learner_peak_rss_mib"],
            "wall": lora["wall_s"] / full["wall_s"],
            "greedy after": lora["after"]["greedy_acc"] / full["after"]["greedy_acc"],
        }
    report["meta"].update(cpu_at_end=cpu_state(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    print_table(table(report), report["meta"])
    print(f"\nsaved {save(report, args.out, NAME)}")


if __name__ == "__main__":
    main()
