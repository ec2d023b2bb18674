"""The race's figures: samples/s, time to each accuracy threshold, accuracy at equal training
time, the opdplus/TRL ratios, and the printed table and curves."""

from __future__ import annotations

from common import Row

THRESHOLDS = (0.80, 0.90)


def side_figures(run: dict, start: dict, samples_per_step: int) -> dict:
    """samples/s, time to each threshold, and the accuracy curve (step 0 = the start)."""
    curve = [{"step": 0, "train_s": 0.0, **start}] + run["checkpoints"]
    last = run["checkpoints"][-1] if run["checkpoints"] else None
    train_s = last["train_s"] if last else None
    reach = {}
    for thr in THRESHOLDS:
        hit = next((c for c in curve if c.get("greedy_acc", -1) >= thr), None)
        reach[f"{thr:.2f}"] = None if hit is None else {"step": hit["step"], "s": hit["train_s"]}
    return {
        "train_s": train_s,
        "peak_added_gib": run.get("memory", {}).get("peak_added_gib"),
        "samples": (last["step"] * samples_per_step) if last else 0,
        "samples_per_s": (last["step"] * samples_per_step / train_s) if last and train_s else None,
        "curve": curve,
        "time_to": reach,
    }


def acc_at(curve: list[dict], seconds: float) -> dict:
    """The last checkpoint reached within ``seconds`` of training."""
    return [c for c in curve if c["train_s"] <= seconds + 1e-9][-1]


def compare(trl: dict, mine: dict) -> dict:
    """opdplus/TRL ratios: samples/s (higher is better), times to threshold (lower is better),
    and each side's greedy accuracy at the shorter run's training time."""

    def ratio(a, b):
        return a / b if a is not None and b else None

    out = {
        "samples_per_s_ratio": ratio(mine["samples_per_s"], trl["samples_per_s"]),
        "memory_ratio": ratio(mine.get("peak_added_gib"), trl.get("peak_added_gib")),
    }
    for thr in trl["time_to"]:
        a, b = mine["time_to"][thr], trl["time_to"][thr]
        out[f"time_to_{thr}_ratio"] = ratio(a and a["s"], b and b["s"])
    if trl["train_s"] and mine["train_s"]:
        seconds = min(trl["train_s"], mine["train_s"])
        a, b = acc_at(mine["curve"], seconds), acc_at(trl["curve"], seconds)
        out["equal_time"] = {
            "s": seconds,
            "opdplus": {"step": a["step"], "greedy_acc": a.get("greedy_acc")},
            "trl": {"step": b["step"], "greedy_acc": b.get("greedy_acc")},
            "greedy_ratio": ratio(a.get("greedy_acc"), b.get("greedy_acc")),
        }
    return out


def _fmt(x, spec=".3f", none="—"):
    return none if x is None else format(x, spec)


def _reach(fig: dict, thr: str) -> str:
    hit = fig["time_to"][thr]
    return "not reached" if hit is None else f"{hit['s']:.0f} s (step {hit['step']})"


def table(report: dict) -> list[Row]:
    figs, cmp_ = report.get("figures", {}), report.get("comparison", {})
    if "trl" not in figs:
        return [("figures", "none (a run failed; see the JSON)", "")]
    trl = figs["trl"]
    rows: list[Row] = [
        ("TRL samples/s (training)", _fmt(trl["samples_per_s"], ".1f"), "baseline"),
        ("TRL start-up s", _fmt(report["runs"]["trl"]["startup_s"], ".1f"), "—"),
        ("TRL memory added (peak GiB)", _fmt(trl.get("peak_added_gib"), ".2f"), "baseline"),
    ]
    for thr in trl["time_to"]:
        rows.append((f"TRL time to {thr} greedy", _reach(trl, thr), "baseline"))
    for name, fig in figs.items():
        if name == "trl":
            continue
        c = cmp_[name]
        rows += [
            (
                f"{name} samples/s",
                f"{_fmt(fig['samples_per_s'], '.1f')} ({_fmt(c['samples_per_s_ratio'], '.2f')}x)",
                ">= 1.0x TRL",
            ),
            (f"{name} start-up s", _fmt(report["runs"][name]["startup_s"], ".1f"), "—"),
            (
                f"{name} memory added (peak GiB)",
                f"{_fmt(fig.get('peak_added_gib'), '.2f')} ({_fmt(c.get('memory_ratio'), '.2f')}x)",
                "—",
            ),
        ]
        for thr in fig["time_to"]:
            r = c[f"time_to_{thr}_ratio"]
            rows.append(
                (
                    f"{name} time to {thr} greedy",
                    f"{_reach(fig, thr)}" + ("" if r is None else f" ({r:.2f}x)"),
                    "< 1.0x TRL" if thr == "0.90" else "—",
                )
            )
        eq = c.get("equal_time")
        if eq:
            rows.append(
                (
                    f"{name} vs TRL greedy at {eq['s']:.0f} s",
                    f"{_fmt(eq['opdplus']['greedy_acc'])} vs {_fmt(eq['trl']['greedy_acc'])}",
                    "—",
                )
            )
    return rows


def print_curves(report: dict) -> None:
    figs = report.get("figures", {})
    if not figs:
        return
    print("\ngreedy accuracy [avg@k] per checkpoint (training seconds)")
    for name, fig in figs.items():
        cells = [
            f"{c['step']}: {_fmt(c.get('greedy_acc'))} [{_fmt(c.get('avg_at_k'))}] "
            f"({c['train_s']:.0f} s)"
            for c in fig["curve"]
        ]
        print(f"  {name:<10} " + " | ".join(cells))
