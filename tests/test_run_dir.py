"""The run directory (services/run_dir.py): the lock a second driver meets, resume
compatibility (the registry and the diff), the checks before config.toml is written, and a
read-only or full disk. No engine starts: the run directories are written here the way a run
writes them (config.toml, metrics.jsonl, checkpoints/latest)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.config import Config, ConfigError, check_ray_address, to_toml
from services.errors import UserError
from services.metrics import DiskError, MetricsLogger
from services.run_dir import (
    HARMLESS_KEYS,
    LOCK_NAME,
    TRAINED_KEYS,
    ResumeMismatch,
    RunDirError,
    RunDirLock,
    RunDirLocked,
    check_resume,
    config_keys,
    prepare_run_dir,
    resume_diff,
)

REPO = Path(__file__).resolve().parent.parent


def _cfg(tmp_path: Path, name: str = "run", **sets) -> Config:
    from services.config import load_config

    base = {"run.name": f'"{name}"', "run.out_dir": f'"{tmp_path}"'}
    base |= {k: v for k, v in sets.items()}
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def _with(cfg: Config, section: str, **values) -> Config:
    return dataclasses.replace(
        cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)}
    )


def _a_run_with_a_checkpoint(cfg: Config) -> Path:
    """What a run that checkpointed step 2 left: its config, rows, and checkpoints/latest."""
    run_dir, lock = prepare_run_dir(cfg, resume=False)
    lock.close()
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n')
    (run_dir / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != LOCK_NAME
    }


# ----------------------------------------------------------------------------- registry


def unclassified(keys: list[str]) -> list[str]:
    return [k for k in keys if (k in TRAINED_KEYS) == (k in HARMLESS_KEYS)]


def test_every_config_key_is_classified_for_resume():
    """Every key of the schema is in exactly one of TRAINED_KEYS / HARMLESS_KEYS (a new key
    must be classified), and neither names a key the schema does not have."""
    keys = config_keys()
    assert len(keys) > 50 and "rollout.prompts_per_step" in keys
    assert unclassified(keys) == []  # (a misspelt entry leaves its real key unclassified)
    # The check can fail: a key in neither list, and one in both, are reported.
    assert unclassified([*keys, "rollout.new_knob"]) == ["rollout.new_knob"]
    assert unclassified(["eval.every"]) == [] and "eval.every" in HARMLESS_KEYS


def test_resume_diff_names_trained_changes_only(tmp_path):
    cfg = _cfg(tmp_path)
    old = to_toml(cfg)
    assert resume_diff(old, cfg) == []
    harmless = _with(_with(cfg, "eval", every=5), "log", wandb=True)
    assert resume_diff(old, _with(harmless, "rollout", num_samplers=3)) == []
    changed = _with(
        _with(cfg, "rollout", prompts_per_step=32),
        "models",
        student="/elsewhere/student",
    )
    assert resume_diff(old, changed) == [
        "  models.student: 'toy' → '/elsewhere/student'",
        "  rollout.prompts_per_step: 16 → 32",
    ]
    # A stored config from before a key existed: the key counts as its default.
    trimmed = old.replace("temperature = 1.0\n", "", 1)
    assert resume_diff(trimmed, cfg) == []
    assert resume_diff(trimmed, _with(cfg, "rollout", temperature=0.7)) == [
        "  rollout.temperature: 1.0 → 0.7"
    ]
    with pytest.raises(ResumeMismatch, match=r"learner\.num_ranks: 1 → 2") as info:
        check_resume(old, _with(cfg, "learner", num_ranks=2), where="ckpt")
    assert "ckpt" in str(info.value) and "run.name" in str(info.value)


# ----------------------------------------------------------------------------- prepare


def test_resume_with_a_changed_batch_is_refused_with_a_diff(tmp_path):
    cfg = _cfg(tmp_path, **{"rollout.prompts_per_step": 4, "rollout.samples_per_prompt": 2})
    run_dir = _a_run_with_a_checkpoint(cfg)
    before = _snapshot(run_dir)
    bigger = _with(cfg, "rollout", prompts_per_step=8)
    with pytest.raises(ResumeMismatch) as info:
        prepare_run_dir(bigger, resume=True)
    message = str(info.value)
    assert "rollout.prompts_per_step: 4 → 8" in message
    assert str(run_dir / "config.toml") in message
    assert _snapshot(run_dir) == before  # config.toml untouched: checked before it is written
    # The failed check released the lock; a harmless change resumes and is recorded.
    run_dir2, lock = prepare_run_dir(_with(cfg, "eval", every=7), resume=True)
    with lock:
        assert run_dir2 == run_dir
        assert "every = 7" in (run_dir / "config.toml").read_text()


def test_fresh_run_never_reuses_a_run_directory(tmp_path):
    cfg = _cfg(tmp_path)
    run_dir = _a_run_with_a_checkpoint(cfg)
    (run_dir / "metrics.jsonl").unlink()  # a checkpoint alone also marks a run
    before = _snapshot(run_dir)
    with pytest.raises(RunDirError, match="already holds a run"):
        prepare_run_dir(cfg, resume=False)
    assert _snapshot(run_dir) == before
    with pytest.raises(RunDirError, match="no checkpoint to resume from"):
        prepare_run_dir(_cfg(tmp_path, "other"), resume=True)
    assert not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- the lock

HOLDER = """
import sys, time
from services.config import load_config
from services.run_dir import prepare_run_dir
cfg = load_config(None, [f'run.out_dir="{sys.argv[1]}"', 'run.name="run"'])
run_dir, lock = prepare_run_dir(cfg, resume=False)
(run_dir / "metrics.jsonl").write_text('{"step": 0}\\n')
print("locked", flush=True)
sys.stdin.readline()  # hold the lock until told to go
(run_dir / "metrics.jsonl").open("a").write('{"step": 1}\\n')
lock.close()
print("released", flush=True)
"""


def test_a_second_driver_on_the_run_directory_fails_at_once(tmp_path):
    """Another process holds the run (a first driver): a second is refused at once, named by
    its pid and host, and the first's files stay intact; once it ends, --resume works."""
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "locked"
        run_dir = tmp_path / "run"
        before = _snapshot(run_dir)
        cfg = _cfg(tmp_path)
        for resume in (False, True):
            t0 = time.perf_counter()
            with pytest.raises(RunDirLocked) as info:
                _prepare_or_train(cfg, resume=resume, run_dir=run_dir)
            assert time.perf_counter() - t0 < 2.0  # refused, not queued behind the first
            message = str(info.value)
            assert str(run_dir) in message
            assert f"pid {first.pid} on {socket.gethostname()}" in message
            assert _snapshot(run_dir) == before
        first.stdin.write("go\n")
        first.stdin.flush()
        assert first.stdout.readline().strip() == "released"
        assert first.wait(timeout=30) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    # The first driver wrote on undisturbed; the directory is free again.
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 0}\n{"step": 1}\n'
    lock = RunDirLock(run_dir)
    assert lock.held
    lock.close()
    lock.close()  # idempotent
    assert not lock.held


def _prepare_or_train(cfg, *, resume, run_dir):
    """The fresh start goes through the driver's train (it must fail before anything starts);
    the resume through prepare_run_dir (needs a checkpoint marker first)."""
    if not resume:
        from services.driver import train

        return train(cfg, progress=False)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000000")
    try:
        return prepare_run_dir(cfg, resume=True)
    finally:
        (run_dir / "checkpoints" / "latest").unlink()
        (run_dir / "checkpoints").rmdir()


def test_the_lock_is_per_open_and_released_by_close(tmp_path):
    """Two opens in one process conflict too (pytest runs several drivers in one process)."""
    a = RunDirLock(tmp_path)
    with pytest.raises(RunDirLocked, match=f"pid {os.getpid()}"):
        RunDirLock(tmp_path)
    a.close()
    with RunDirLock(tmp_path) as b:
        assert b.held
    assert not b.held


# ----------------------------------------------------------------------------- disks


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only tmpfs mounted on a folder (needs root: mount). Where that is not allowed,
    skipped rather than faked: root ignores file permissions, so chmod cannot stand in."""
    target = tmp_path / "ro"
    target.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {out.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_read_only_run_directory_is_a_clear_error(read_only_dir):
    cfg = _cfg(read_only_dir)
    with pytest.raises(DiskError) as info:
        prepare_run_dir(cfg, resume=False)
    message = str(info.value)
    assert str(read_only_dir / "run") in message
    assert "read-only" in message and "run.out_dir" in message
    assert isinstance(info.value, UserError)
    with pytest.raises(DiskError, match="read-only"):
        MetricsLogger(read_only_dir, tensorboard=False, ray_metrics=False)


def test_full_disk_is_a_clear_error_naming_the_file(tmp_path):
    """A full disk, as the kernel reports it: writes to /dev/full fail with ENOSPC."""
    logger = MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False)
    logger.log(1, {"learner/loss": 1.0})
    logger._file.close()
    logger._file = open("/dev/full", "a", buffering=1)  # noqa: SIM115 (closed by logger.close)
    with pytest.raises(DiskError) as info:
        logger.log(2, {"learner/loss": 0.5})
    logger.close()
    message = str(info.value)
    assert str(tmp_path / "metrics.jsonl") in message
    assert "no space left" in message and "--resume" in message
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "learner/loss": 1.0}\n'


# ----------------------------------------------------------------------------- config checks


def test_a_dead_ray_address_is_an_error_in_seconds():
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.perf_counter()
        with pytest.raises(
            ConfigError, match=f"ray.address: nothing answers at '127.0.0.1:{port}'"
        ):
            check_ray_address(f"127.0.0.1:{port}", timeout_s=2.0)
        assert time.perf_counter() - t0 < 3.0
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        check_ray_address("no-port-here")
    for fine in ("", "auto", "local"):
        check_ray_address(fine)
    with socket.socket() as s:  # a live listener answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        check_ray_address(f"127.0.0.1:{s.getsockname()[1]}")
        check_ray_address(f"ray://127.0.0.1:{s.getsockname()[1]}")


def test_prepare_checks_the_ray_address_before_writing(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        cfg = _with(_cfg(tmp_path), "ray", address=f"127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(ConfigError, match="ray.address"):
            prepare_run_dir(cfg, resume=False)
    assert not (tmp_path / "run").exists()
