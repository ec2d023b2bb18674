"""Checkpoint manifests (learner/manifest.py): hashes written at save, checked before load; a
folder whose files changed is refused with a clear message and nothing is loaded."""

from __future__ import annotations

import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from learner import manifest
from learner.manifest import CheckpointIntegrityError
from services.errors import UserError


def _folder(tmp_path: Path) -> Path:
    d = tmp_path / "step_00000001"
    (d / "sub").mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x04weights" * 100)
    (d / "sub" / "optim.pt").write_bytes(b"\x80\x04optim" * 50)
    return d


def test_manifest_round_trip_and_every_kind_of_tampering(tmp_path):
    d = _folder(tmp_path)
    written = manifest.write(d)
    listed = json.loads(written.read_text())["files"]
    assert set(listed) == {"mp_rank_00_model_states.pt", "sub/optim.pt"}
    manifest.verify(d)  # untouched: accepted

    (d / "sub" / "optim.pt").write_bytes(b"\x80\x04evil" * 50)  # replaced (same size or not)
    with pytest.raises(CheckpointIntegrityError, match="changed since it was saved: sub/optim.pt"):
        manifest.verify(d)
    manifest.write(d)
    (d / "extra.pt").write_bytes(b"x")  # a file slipped in
    with pytest.raises(CheckpointIntegrityError, match="not in the manifest: extra.pt"):
        manifest.verify(d)
    (d / "extra.pt").unlink()
    (d / "mp_rank_00_model_states.pt").unlink()  # a file gone
    with pytest.raises(CheckpointIntegrityError, match="missing mp_rank_00_model_states.pt"):
        manifest.verify(d)
    (d / manifest.MANIFEST).unlink()
    with pytest.raises(CheckpointIntegrityError, match="no MANIFEST"):
        manifest.verify(d)
    # The CLI prints UserErrors as one clean line.
    assert issubclass(CheckpointIntegrityError, UserError)


def test_same_size_byte_flip_is_caught(tmp_path):
    d = _folder(tmp_path)
    manifest.write(d)
    p = d / "mp_rank_00_model_states.pt"
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match="mp_rank_00_model_states.pt"):
        manifest.verify(d)


# --------------------------------------------------------------- real DeepSpeed (worker process)


def _save_tamper_load(model_dir: str, ckpt_dir: str) -> dict:
    from tests.test_learner_engine import _engine, _step, make_batch

    a = _engine(model_dir, 1, lr=1e-2)
    _step(a, make_batch(4, seed=2))
    saved = a.save_checkpoint(ckpt_dir, {"step": 1})
    listed = sorted(json.loads((saved / manifest.MANIFEST).read_text())["files"])
    b = _engine(model_dir, 1, lr=1e-2)
    assert b.load_checkpoint(ckpt_dir) == {"step": 1}  # intact: loads
    # Replace the model states file with another (valid!) pickle: refused before loading.
    target = next(p for p in saved.rglob("*model_states.pt"))
    import torch

    torch.save({"not": "the saved weights"}, target)
    c = _engine(model_dir, 1, lr=1e-2)
    before = c.export_weights()
    try:
        c.load_checkpoint(ckpt_dir)
        error = None
    except CheckpointIntegrityError as exc:
        error = str(exc)
    after = c.export_weights()
    unchanged = all(torch.equal(x, y) for (_, x), (_, y) in zip(before, after, strict=True))
    return {"listed": listed, "error": error, "unchanged": unchanged, "steps": c.global_steps}


@pytest.mark.slow
def test_engine_refuses_a_tampered_checkpoint(tmp_path):
    from tests.test_learner_engine import save_tiny_student

    student = save_tiny_student(tmp_path / "student")
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        out = pool.submit(_save_tamper_load, student, str(tmp_path / "ckpt")).result()
    assert any(n.endswith("model_states.pt") for n in out["listed"])
    assert out["error"] is not None and "does not match its manifest" in out["error"]
    assert "model_states.pt" in out["error"]
    assert out["unchanged"] and out["steps"] == 0, "nothing may be loaded from a refused folder"
