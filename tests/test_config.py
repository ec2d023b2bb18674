"""Config loading, validation messages, shipped configs, and the CLI's error behaviour."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.config import Config, ConfigError, describe, load_config, to_toml

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "deploy" / "configs").glob("*.toml"))


def test_divergences_come_from_the_maths_registry(tmp_path):
    """A name added to the registry is a valid distill.divergence with no other edit."""
    from learner import divergences

    doc = dict((k, d) for k, _, d in describe())["distill.divergence"]
    assert all(name in doc for name in divergences.divergence_names())
    divergences.DIVERGENCES["test_only"] = divergences.DIVERGENCES["js"]
    try:
        assert load_config(None, ["distill.divergence=test_only"]).distill.divergence == "test_only"
    finally:
        del divergences.DIVERGENCES["test_only"]
    with pytest.raises(ConfigError, match="unknown divergence 'test_only'"):
        load_config(None, ["distill.divergence=test_only"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the resolved TOML (written to every run directory) round-trips to the same config
    again = load_config_from_text(to_toml(cfg))
    assert again == cfg


def load_config_from_text(text: str) -> Config:
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    return load_config(f.name)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"demo.toml", "toy.toml", "smollm2.toml", "gpu_cluster.toml"} <= names


def test_overrides_are_typed():
    cfg = load_config(
        None,
        ["distill.divergence=js", "learner.lr=0.01", "rollout.max_staleness=0", "log.wandb=true"],
    )
    assert cfg.distill.divergence == "js"
    assert cfg.learner.lr == 0.01
    assert cfg.rollout.max_staleness == 0
    assert cfg.log.wandb is True


@pytest.mark.parametrize(
    "override, expected",
    [
        ("distill.divergense=js", "did you mean 'divergence'"),
        ("learnr.lr=0.1", "did you mean 'learner'"),
        ("learner.lr=fast", "learner.lr: expected a number"),
        ("rollout.num_samplers=1.5", "rollout.num_samplers: expected an integer"),
        ("distill.divergence=kl", "unknown divergence 'kl'; valid: reverse_kl, forward_kl"),
        ("distill.estimator=ppo", "'ppo' is not one of 'opd_plus', 'opd'"),
        ("distill.discount=1.5", "distill.discount: must be in [0, 1]"),
        ("learner.num_ranks=3", "learner.num_ranks: must divide the step's 64 samples"),
        ("rollout.channel_capacity=8", "must hold at least one step's samples"),
        ("ray.num_cpus=1", "the actors reserve 2 CPUs"),
        ("learner.sync_every=3", "rollout.max_staleness"),
        ("learner.threads=-1", "learner.threads: must be >= 0"),
    ],
)
def test_config_errors_name_the_key(override, expected):
    sets = [override]
    if override.startswith("ray.num_cpus"):
        sets.append("learner.cpus_per_rank=1.0")
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    assert expected in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[run\nsteps = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: not valid TOML"):
        load_config(bad)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_help_is_fast_and_light():
    t0 = time.perf_counter()
    out = _cli("--help")
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0 and "train" in out.stdout
    assert elapsed < 3.0, f"--help took {elapsed:.2f}s"
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, services.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch','ray','vllm','deepspeed','transformers') if m in sys.modules))",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--set", "distill.divergense=js"], "did you mean 'divergence'"),
        (["--set", "distill.divergence=kl"], "valid: reverse_kl"),
        (["--set", "learner.lr=fast"], "expected a number"),
        (["--set", "ray.num_cpus=1"], "inconsistent resources"),
    ],
)
def test_cli_config_errors_exit_nonzero_without_traceback(args, expected):
    out = _cli("train", "--config", "deploy/configs/toy.toml", *args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("opdplus: error:")
    assert expected in out.stderr


def test_config_describe_lists_every_key():
    out = _cli("config", "--describe")
    assert out.returncode == 0
    for key in ("distill.divergence", "rollout.max_staleness", "learner.zero_stage", "run.steps"):
        assert key in out.stdout
