"""Smoke tests of the ``opdplus`` commands the README shows, run as a user types them: the
installed console script in a subprocess, from the repository root.

The ones that start an engine or Ray, or need the toy pair (minutes to build on a cold cache),
are marked ``slow``. ``train``, ``demo`` and ``smollm2`` are exercised through ``--help`` only
(a run or a build takes minutes; tests/test_train_e2e.py trains, tests/test_real_models.py
builds the SmolLM2 pair).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from ledger_fixtures import clean_rows, ledger_config, write_run_dir

REPO = Path(__file__).resolve().parents[1]
OPDPLUS = Path(sys.executable).parent / "opdplus"
RUN_FOR_REAL = {"config", "ledger", "scale", "toy-models", "eval", "data"}
HELP_ONLY = {"train", "demo", "smollm2"}


def opdplus(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    assert OPDPLUS.is_file(), f"{OPDPLUS}: the console script is not installed (make setup)"
    return subprocess.run(
        [str(OPDPLUS), *args],
        cwd=REPO,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _subcommands() -> set[str]:
    from services.cli import _parser

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def _readme_commands() -> set[str]:
    """Subcommands in the README's shell blocks (prose mentions of opdplus are not commands)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    return {
        m for block in blocks for m in re.findall(r"^\s*opdplus ([a-z][a-z0-9-]*)", block, re.M)
    }


def test_every_command_is_smoked():
    """Every subcommand, and every one the README shows, has a smoke test below."""
    assert _subcommands() == RUN_FOR_REAL | HELP_ONLY
    shown = _readme_commands()
    assert {"train", "eval", "config", "ledger", "scale"} <= shown
    assert shown <= RUN_FOR_REAL | HELP_ONLY


def _no_traceback(out: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]


# --- help -----------------------------------------------------------------------------------


def test_help_lists_every_command():
    out = opdplus("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: opdplus")
    for name in _subcommands():
        assert name in out.stdout, name


@pytest.mark.parametrize("command", sorted(RUN_FOR_REAL | HELP_ONLY))
def test_subcommand_help(command):
    out = opdplus(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: opdplus {command}")
    _no_traceback(out)


# --- config ---------------------------------------------------------------------------------


def test_config_describe():
    from services.config import describe

    out = opdplus("config", "--describe")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [ln.split(" = ")[0].strip() for ln in lines] == [k for k, _, _ in describe()]
    assert all("  # " in ln for ln in lines)


def test_config_prints_a_loadable_resolved_config(tmp_path):
    from services.config import load_config

    out = opdplus("config", "--config", "deploy/configs/toy.toml", "--set", "distill.divergence=js")
    assert out.returncode == 0, out.stderr
    (tmp_path / "resolved.toml").write_text(out.stdout)
    assert load_config(tmp_path / "resolved.toml") == load_config(
        REPO / "deploy/configs/toy.toml", ["distill.divergence=js"]
    )


# --- ledger ---------------------------------------------------------------------------------


def test_ledger_on_a_clean_and_a_broken_run(tmp_path):
    cfg = ledger_config()
    rows = clean_rows(cfg)
    clean = write_run_dir(tmp_path / "clean", cfg, rows)
    out = opdplus("ledger", str(clean))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True and report["steps"] == len(rows)

    broken_rows = copy.deepcopy(rows)
    del broken_rows[1]
    broken = write_run_dir(tmp_path / "broken", cfg, broken_rows)
    out = opdplus("ledger", str(broken))
    assert out.returncode == 1
    report = json.loads(out.stdout)
    assert report["ok"] is False
    assert any("steps are [1, 3]" in p for p in report["problems"]), report["problems"]
    _no_traceback(out)


def test_ledger_on_a_folder_that_is_not_a_run(tmp_path):
    """Pointing at the wrong folder is a user's mistake: a message, not a traceback."""
    out = opdplus("ledger", str(tmp_path))
    assert out.returncode != 0
    assert str(tmp_path) in out.stderr
    _no_traceback(out)


# --- scale ----------------------------------------------------------------------------------


def _run_dir_without_a_job(tmp_path, ray_address: str) -> Path:
    # A unique name: the command must never find (and resize) somebody else's job.
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    cfg = ledger_config(name, str(tmp_path))
    cfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, address=ray_address))
    return write_run_dir(tmp_path / name, cfg)


@pytest.mark.slow
def test_scale_without_a_running_job(tmp_path, ray_local):
    """A Ray cluster that runs no job of this name: a clear error naming the run."""
    address = ray_local.get_runtime_context().gcs_address
    run_dir = _run_dir_without_a_job(tmp_path, address)
    out = opdplus("scale", str(run_dir), "--samplers", "2")
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"opdplus: error: no running job for {run_dir}"), last
    _no_traceback(out)


def test_scale_without_any_ray_cluster(tmp_path, monkeypatch, capsys):
    """What ``ray.init(address="auto")`` raises when no cluster runs, injected (a real
    cluster-free machine cannot be arranged here: other tests' clusters are found too)."""
    import ray

    from services.cli import main

    def no_cluster(*args, **kwargs):
        raise ConnectionError(
            "Could not find any running Ray instance. Please specify the one to connect to "
            "by setting `--address` flag or `RAY_ADDRESS` environment variable."
        )

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    run_dir = _run_dir_without_a_job(tmp_path, "")
    assert main(["scale", str(run_dir), "--samplers", "2"]) == 2
    assert str(run_dir) in capsys.readouterr().err


def test_scale_on_a_folder_that_is_not_a_run(tmp_path):
    out = opdplus("scale", str(tmp_path), "--samplers", "2")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        f"opdplus: error: {tmp_path} is not a run directory (no config.toml)"
    )
    _no_traceback(out)


# --- data -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_data_on_the_chat_example(toy_pair):
    """The README's `opdplus data` on the shipped chat example: counts, skips, lengths, the
    rendering check and one prompt as each model sees it, as JSON."""
    out = opdplus("data", "--config", "deploy/configs/chat_example.toml", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    counts = report["counts"]
    assert (
        counts["rows"] == counts["train"] + counts["eval"] == 240 and counts["role_patterns"] == 3
    )
    assert report["prompt_tokens"]["train"]["p100"] >= report["prompt_tokens"]["train"]["p50"] > 1
    assert "identical token ids" in report["rendering_check"]
    assert report["example"]["teacher_sees"] == report["example"]["student_sees"]


# --- models and evaluation ------------------------------------------------------------------


@pytest.mark.slow
def test_toy_models_reuses_the_cache(toy_pair):
    stamps = {
        p: p.stat().st_mtime_ns
        for d in (toy_pair.teacher_dir, toy_pair.student_dir)
        for p in Path(d).iterdir()
    }
    out = opdplus("toy-models")
    assert out.returncode == 0, out.stderr[-3000:]
    shown = json.loads(out.stdout)
    assert Path(shown["teacher"]) == Path(toy_pair.teacher_dir)
    assert Path(shown["student"]) == Path(toy_pair.student_dir)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rebuilt


@pytest.mark.slow
def test_eval_toy_student_prints_json_accuracy(toy_pair, tmp_path):
    result_file = tmp_path / "eval.json"
    out = opdplus(
        "eval",
        "--model",
        "toy-student",
        "--task",
        "arithmetic",
        "--n",
        "8",
        "--k",
        "2",
        "--max-tokens",
        "40",
        "--out",
        str(result_file),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(result_file.read_text())
    # The same JSON went to stdout (engine logs, if any, come before it).
    assert json.loads(out.stdout[out.stdout.index("{\n") :]) == result
    assert Path(result["model"]) == Path(toy_pair.student_dir)
    assert result["n_problems"] == 8 and result["k"] == 2
    assert 0.0 <= result["greedy_acc"] <= 1.0
    n_correct = result["full_report"]["greedy"]["n_correct"]
    assert result["greedy_acc"] == n_correct / 8
    assert 0.0 <= result["avg_at_k"] <= result["pass_at_k"] <= 1.0
    lo, hi = result["greedy_ci"]
    assert 0.0 <= lo <= hi <= 1.0


@pytest.mark.slow
def test_eval_runs_episodes_with_the_calculator(toy_tool_pair):
    """README's `opdplus eval --environment calculator` on the toy tool teacher: every greedy
    episode calls the calculator and, with its answers in the loop, the teacher is right (it
    cannot multiply in its head: without the environment it scores ~0); the tool-call rates
    are reported as the run's evaluation reports them (eval/greedy_tool_call_rate)."""
    out = opdplus(
        "eval",
        "--model",
        "toy_tool-teacher",
        "--task",
        "jsonl",
        "--path",
        str(toy_tool_pair.train_path),
        "--eval-path",
        str(toy_tool_pair.heldout_path),
        "--environment",
        "calculator",
        "--max-turns",
        "3",
        "--max-episode-tokens",
        "48",
        "--max-tokens",
        "24",
        "--n",
        "8",
        "--k",
        "2",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout[out.stdout.index("{\n") :])
    assert Path(result["model"]) == Path(toy_tool_pair.teacher_dir)
    assert result["n_problems"] == 8 and result["k"] == 2
    assert result["greedy_tool_call_rate"] == 1.0, result["examples"]
    assert result["greedy_acc"] >= 7 / 8, result["examples"]
    assert 0.0 <= result["avg_at_k_tool_call_rate"] <= 1.0
    first = result["examples"][0]
    assert "<calc>" in first["completion"] and "[" not in first["completion"], first
