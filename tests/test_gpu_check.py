"""scripts/gpu_check.sh, checked on CPU: it is run blind on a GPU machine with minutes to
spare, so its plan must parse, fit the budget and name only things that exist, and its runner
must report and continue the way its header says."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
PARTS = ["env", "install", "gpu-tests", "pair", "train", "bench-sampling", "bench-weight-sync"]
BUDGET_S = 600
STEP = re.compile(r"^step (\d+) ([\w-]+): timeout (\d+) s(?:, needs [\w, -]+)?: (.+)$")
PATHLIKE = re.compile(r"^[\w./-]+$")  # a token that could be a path in the repository
SUMMARY = re.compile(r"^gpu_check: ([\w-]+): (ok|FAILED|skipped) \((\d+) s\) ?(.*)$")


def _run(*args: str, env: dict | None = None, tmp: Path) -> subprocess.CompletedProcess:
    base = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp),
        "OUT": str(tmp / "out"),
        "GPU_CHECK_WORK": str(tmp / "work"),
    }
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env=base | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _plan(tmp: Path, gpus: int) -> dict[str, tuple[int, str]]:
    proc = _run("--dry-run", env={"GPU_CHECK_GPUS": str(gpus)}, tmp=tmp)
    assert proc.returncode == 0, proc.stderr
    steps = [m.groups() for m in map(STEP.match, proc.stdout.splitlines()) if m]
    assert [name for _, name, _, _ in steps] == PARTS, proc.stdout
    assert [int(i) for i, _, _, _ in steps] == list(range(1, len(PARTS) + 1))
    assert not (tmp / "out").exists() and not (tmp / "work").exists(), "a dry run wrote files"
    return {name: (int(timeout), cmd) for _, name, timeout, cmd in steps}


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_help_and_bad_arguments(tmp_path):
    proc = _run("--help", tmp=tmp_path)
    assert proc.returncode == 0 and "--dry-run" in proc.stdout and "Usage:" in proc.stdout
    assert _run("--bogus", tmp=tmp_path).returncode == 2


@pytest.mark.parametrize("gpus", [1, 3])
def test_dry_run_plan_fits_the_budget_and_names_real_files(tmp_path, gpus):
    plan = _plan(tmp_path, gpus)
    assert all(timeout > 0 for timeout, _ in plan.values())
    total = sum(timeout for timeout, _ in plan.values())
    assert total <= BUDGET_S, f"timeouts add up to {total} s > {BUDGET_S} s"

    named = set()
    for part, (_, cmd) in plan.items():
        for token in shlex.split(cmd.replace(";", " ")):
            if not PATHLIKE.match(token) or token.startswith(("-", "/")):
                continue
            if token == "tests" or "/" in token or token.endswith((".py", ".toml", ".txt")):
                assert (REPO / token).exists(), f"{part}: {token} does not exist"
                named.add(token)
    expected = {
        "tests",
        "constraints.txt",
        "deploy/configs/smollm2.toml",
        "bench/smollm_sampling.py",
        "bench/weight_sync.py",
    }
    assert expected <= named, f"the plan no longer names {expected - named}"


def test_plan_matches_the_project(tmp_path):
    """Extras, the gpu marker, bench flags: what the commands rely on exists in the project."""
    plan = _plan(tmp_path, 1)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert {"gpu", "dev"} <= set(extras["optional-dependencies"])
    assert "'.[gpu,dev]'" in plan["install"][1]
    assert any("pytest.mark.gpu" in p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    common = (REPO / "bench" / "common.py").read_text()
    for part in ("bench-sampling", "bench-weight-sync"):
        tokens = shlex.split(plan[part][1])
        script = next(t for t in tokens if t.startswith("bench/"))
        source = (REPO / script).read_text() + common
        for flag in (t for t in tokens if t.startswith("--")):
            assert f'"{flag}"' in source, f"{script} has no {flag}"
    assert '"headline"' in (REPO / "bench" / "smollm_sampling.py").read_text()


@pytest.mark.parametrize(("gpus", "backend"), [(1, "object_store"), (3, "nccl")])
def test_train_overrides_are_a_valid_config(tmp_path, monkeypatch, gpus, backend):
    from services.config import load_config

    tokens = shlex.split(_plan(tmp_path, gpus)["train"][1])
    start = tokens.index("train")
    config = tokens[tokens.index("--config", start) + 1]
    end = tokens.index("&&", start)
    sets = [tokens[i + 1] for i in range(start, end) if tokens[i] == "--set"]
    monkeypatch.chdir(REPO)  # task.path in the config is relative to the repository
    cfg = load_config(REPO / config, sets)
    assert cfg.run.steps <= 5
    assert cfg.rollout.sync_backend == backend
    assert cfg.rollout.sampler_gpus > 0 and cfg.rollout.scorer_gpus > 0
    assert cfg.learner.gpus_per_rank > 0


def test_runner_reports_every_part_and_continues(tmp_path):
    """A failing install (no python to make the venv) skips what needs it; the rest report."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text('#!/bin/sh\necho "GPU 0: NVIDIA Fake (UUID: GPU-0)"\n')
    (fake / "python").write_text('#!/bin/sh\necho "no python on this machine" >&2\nexit 7\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    proc = _run(
        "--only",
        "env,install,gpu-tests,train",
        env={"PATH": f"{fake}:/usr/local/bin:/usr/bin:/bin", "PYTHON": str(fake / "python")},
        tmp=tmp_path,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [m.groups() for m in map(SUMMARY.match, proc.stdout.splitlines()) if m]
    assert [name for name, *_ in lines] == PARTS, proc.stdout
    status = {name: (state, detail) for name, state, _, detail in lines}
    assert status["env"][0] == "ok" and status["env"][1].startswith("1 GPU(s)")
    assert status["install"][0] == "FAILED" and status["install"][1].startswith("exit 7")
    assert status["gpu-tests"] == ("skipped", "needs install (FAILED)")
    assert status["train"] == ("skipped", "needs install (FAILED) pair (skipped)")
    assert status["pair"] == ("skipped", "not selected (--only env,install,gpu-tests,train)")
    assert "    | no python on this machine" in proc.stdout  # the failed part's log tail
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["env.log", "install.log", "summary.txt"]
    assert len((out / "summary.txt").read_text().splitlines()) == len(PARTS)
    assert proc.stdout.rstrip().splitlines()[-1].startswith("gpu_check: done: 1 of 7 parts")
