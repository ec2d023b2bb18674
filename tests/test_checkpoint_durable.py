"""Durable checkpoints (learner/engine.py + learner/manifest.py), with the real DeepSpeed engine
on the tiny model in a spawned worker, as the other checkpoint tests:

- every file and folder of a checkpoint is fsynced before ``latest`` moves, and the folder
  after it moved;
- ``keep`` checkpoints are kept, stale ``.partial`` folders pruned;
- a corrupt newest checkpoint: the resume falls back to the previous one and says which it
  skipped and why; saving that step again replaces the corrupt folder;
- a ``latest`` that is not a plain tag (``../x``) or links out of the folder is refused;
- ``run.storage`` (services/storage.py) through pyarrow's real LocalFileSystem (``file://``):
  the checkpoint is uploaded, the local copy lost, the newest remote one corrupted, and the
  resume downloads and falls back the same way;
- a disk that fills up inside DeepSpeed's own writer (a real 2 MiB tmpfs): an error naming the
  path and "no space left", not torch's opaque RuntimeError; ``latest`` keeps the last complete
  checkpoint.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import subprocess
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from learner import manifest


def _fsync_spy():
    """Record (kind, path) for every os.fsync, os.replace and shutil.rmtree, in order (the
    real calls run). Returns the list and a function that removes the spy."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(dst)))
        return real_replace(src, dst, *a, **k)

    def rmtree(path, *a, **k):
        events.append(("rmtree", str(path)))
        return real_rmtree(path, *a, **k)

    def undo():
        os.fsync, os.replace, shutil.rmtree = real_fsync, real_replace, real_rmtree

    os.fsync, os.replace, shutil.rmtree = fsync, replace, rmtree
    return events, undo


def _durable(model_dir: str, root: str, store: str) -> dict:
    from learner.engine import LearnerEngine  # noqa: F401  (deepspeed import before the spy)
    from services.storage import Remote
    from tests.test_learner_engine import _engine, _step, make_batch

    root_p = Path(root)
    out: dict = {}
    a = _engine(model_dir, 1, lr=1e-2)
    weights = {}
    remote = Remote(store, "run")
    for step in (1, 2, 3):
        _step(a, make_batch(3, seed=step))
        if step == 3:
            # A crashed save of another step and a crashed download: both pruned.
            (root_p / "step_00000099.partial").mkdir()
            (root_p / "step_00000002.partial").mkdir()
            events, undo = _fsync_spy()
        saved = a.save_checkpoint(root, {"step": step}, keep=2)
        if step == 3:
            undo()
            out["events"] = events
        weights[step] = a.export_weights()
        remote.upload_checkpoint(root_p, saved.name, keep=2)
    out["files"] = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    out["listing"] = sorted(p.name for p in root_p.iterdir() if p.name.startswith("step_"))
    out["remote_tags"] = remote.tags()

    # Corrupt the newest checkpoint: a resume loads step 2 and says it skipped step 3.
    target = next((root_p / "step_00000003").rglob("*model_states.pt"))
    target.write_bytes(target.read_bytes()[:-10])
    b = _engine(model_dir, 1, lr=1e-2)
    out["state"] = b.load_checkpoint(root)
    out["loaded"] = b.last_load.tag
    out["note"] = b.last_load.note(root)
    out["steps"] = b.global_steps
    out["restored_equal"] = _same(b.export_weights(), weights[2])
    # Training on from the fallback saves step 3 again over the corrupt folder.
    _step(b, make_batch(3, seed=3))
    b.save_checkpoint(root, {"step": 3}, keep=2)
    manifest.verify(root_p / "step_00000003")
    out["latest_after_resave"] = (root_p / "latest").read_text()

    # run.storage: the local copies are gone (a fresh learner node), the newest remote
    # checkpoint is corrupt: fetch downloads it, then the previous one; the load falls back.
    shutil.rmtree(root_p)
    rtarget = next(
        (Path(store.removeprefix("file://")) / "run/checkpoints/step_00000003").rglob(
            "*model_states.pt"
        )
    )
    rtarget.write_bytes(b"\x80\x04not the saved weights")
    out["fetched"] = remote.fetch(root_p)
    c = _engine(model_dir, 1, lr=1e-2)
    out["remote_state"] = c.load_checkpoint(root)
    out["remote_note"] = c.last_load.note(root)
    out["remote_restored_equal"] = _same(c.export_weights(), weights[2])

    # A `latest` that is not a plain tag is refused before anything is opened.
    errors = {}
    for bad in ("../x", "step_00000002/../../x", "/etc"):
        (root_p / "latest").write_text(bad)
        try:
            _engine(model_dir, 1).load_checkpoint(root)
        except manifest.CheckpointTagError as exc:
            errors[bad] = str(exc)
    outside = root_p.parent / "elsewhere"
    shutil.copytree(root_p / "step_00000002", outside)
    shutil.rmtree(root_p / "step_00000002")
    os.symlink(outside, root_p / "step_00000002")
    (root_p / "latest").write_text("step_00000002")
    try:
        _engine(model_dir, 1).load_checkpoint(root)
    except manifest.CheckpointTagError as exc:
        errors["symlink"] = str(exc)
    out["errors"] = errors
    return out


def _same(x, y) -> bool:
    import torch

    return all(torch.equal(a, b) for (_, a), (_, b) in zip(x, y, strict=True))


@pytest.mark.slow
def test_checkpoints_are_durable_verified_and_fall_back(tmp_path):
    from tests.test_learner_engine import save_tiny_student

    student = save_tiny_student(tmp_path / "student")
    root, store = tmp_path / "ckpt", tmp_path / "store"
    store.mkdir()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out = pool.submit(_durable, student, str(root), f"file://{store}").result()

    # fsync: every file of the checkpoint and every folder in it, then the rename, then the
    # checkpoints folder, and only then is `latest` replaced; the folder is fsynced after.
    events = out["events"]
    at = next(i for i, (k, p) in enumerate(events) if k == "replace" and p.endswith("/latest"))
    before = {p for k, p in events[:at] if k == "fsync"}
    partial = f"{root}/step_00000003.partial"
    for name in out["files"]:
        if name != manifest.MANIFEST:
            assert f"{partial}/{name}" in before, f"{name} not fsynced before latest moved"
    assert partial in before, "the checkpoint folder itself was not fsynced"
    assert str(root) in before, "the rename into step_00000003 was not made durable"
    assert events[at + 1] == ("fsync", str(root)), "latest's rename was not made durable"
    # Pruning comes after, and only then: the old checkpoints go once the new one is durable.
    assert ("rmtree", f"{root}/step_00000001") in events[at + 2 :]
    # keep=2: two checkpoints locally and remotely; crashed .partial folders pruned.
    assert out["listing"] == ["step_00000002", "step_00000003"]
    assert out["remote_tags"] == ["step_00000002", "step_00000003"]
    # Corrupt newest: falls back to step 2, and says which it skipped and why.
    assert out["state"] == {"step": 2} and out["loaded"] == "step_00000002"
    assert out["steps"] == 2 and out["restored_equal"]
    assert "resuming from step_00000002" in out["note"]
    assert "skipped step_00000003" in out["note"] and "model_states.pt" in out["note"]
    assert out["latest_after_resave"] == "step_00000003"
    # run.storage: downloaded the corrupt newest, then the previous one, and fell back.
    assert out["fetched"] == ["step_00000003", "step_00000002"]
    assert out["remote_state"] == {"step": 2} and out["remote_restored_equal"]
    assert "skipped step_00000003" in out["remote_note"]
    # Bad tags are refused, naming the marker and what was expected.
    assert set(out["errors"]) == {"../x", "step_00000002/../../x", "/etc", "symlink"}
    assert "not a checkpoint tag" in out["errors"]["../x"]
    assert f"{root}/latest" in out["errors"]["../x"]
    assert "link out of" in out["errors"]["symlink"]


def _fill_disk(model_dir: str, root: str) -> dict:
    from tests.test_learner_engine import _engine, _step, make_batch

    a = _engine(model_dir, 1, lr=1e-2)
    _step(a, make_batch(3, seed=1))
    a.save_checkpoint(root, {"step": 1}, keep=2)  # 1.4 MB: fits the 2 MiB disk once
    _step(a, make_batch(3, seed=2))
    try:
        a.save_checkpoint(root, {"step": 2}, keep=2)
    except RuntimeError as exc:  # what torch's writer raises on a full disk
        err = manifest.write_failure(root, exc)
        return {
            "raw": str(exc)[:200],
            "type": type(err).__name__,
            "errno": getattr(err, "errno", None),
            "filename": getattr(err, "filename", None),
            "latest": manifest.read_latest(root),
            "probe_left": (Path(root) / ".opdplus-write-probe").exists(),
        }
    return {"raw": "the second save did not fail"}


@pytest.mark.slow
def test_a_disk_full_inside_deepspeeds_writer_is_named(tmp_path):
    """The learner rank turns torch's opaque writer error into the disk's OSError (a probe
    write), and the driver's side (`services.learner_group.rank_disk_error`) turns that, inside
    Ray's wrapper, into a DiskError naming the folder and what to do."""
    from ray.exceptions import RayTaskError

    from services.learner_group import rank_disk_error
    from services.metrics import DiskError
    from tests.test_learner_engine import save_tiny_student

    student = save_tiny_student(tmp_path / "student")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {out.stderr.strip()}")
    try:
        root = str(disk / "ckpt")
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            got = pool.submit(_fill_disk, student, root).result()
        assert manifest.verifies(Path(root) / "step_00000001")  # nothing written is lost
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert got.get("type") == "OSError", got
    assert got["errno"] == errno.ENOSPC and got["filename"] == root, got
    assert got["latest"] == "step_00000001" and not got["probe_left"], got

    # The rank's error reaches the driver inside Ray's wrapper (an OSError subclass).
    rank_err = OSError(errno.ENOSPC, "No space left on device", root)
    wrapped = RayTaskError("save_checkpoint", "traceback", rank_err).as_instanceof_cause()
    assert isinstance(wrapped, OSError)
    err = rank_disk_error(wrapped, root)
    assert isinstance(err, DiskError)
    assert f"cannot write {root}: no space left on the device" in str(err)
    assert "--resume" in str(err)
    other = RayTaskError("x", "tb", OSError(errno.EIO, "I/O error")).as_instanceof_cause()
    assert rank_disk_error(other, root) is other
