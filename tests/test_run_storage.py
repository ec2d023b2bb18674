"""One run storage (services/storage.py), pure logic on real files and pyarrow's real
LocalFileSystem (``file://``): the run directory is absolute wherever it is resolved, a learner
rank that cannot read the driver's marker is refused with both hosts and the path, the remote
copies of checkpoints keep ``latest`` last and fall back past a corrupt one, and the config
refuses what would make a fallback impossible."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from learner import manifest
from services import storage
from services.config import ConfigError, load_config
from services.storage import RunStorageError


def test_the_run_dir_is_absolute_and_the_stored_config_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = storage.resolve_run_dir("runs", "r1")
    assert run_dir == tmp_path / "runs" / "r1" and run_dir.is_absolute()
    cfg = storage.absolute_out_dir(load_config(None, ["run.out_dir=runs"]))
    assert cfg.run.out_dir == str(tmp_path / "runs")
    # From another working directory the stored (absolute) config names the same folder.
    monkeypatch.chdir("/")
    assert storage.resolve_run_dir(cfg.run.out_dir, "r1") == run_dir
    with pytest.raises(ValueError, match="absolute"):
        storage.prepare(Path("runs/r1"))


def test_prepare_writes_the_marker_and_says_where_the_run_lives(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    st = storage.prepare(run_dir, name="run")
    body = json.loads((run_dir / storage.MARKER).read_text())
    assert body["token"] == st.token and body["host"] == st.host and body["path"] == str(run_dir)
    assert f"[opdplus] run directory: {run_dir}" in capsys.readouterr().out
    assert storage.for_run(run_dir) == st  # the driver hands the learner the same storage
    assert storage.probe(st)["ok"]
    storage.judge(st, [storage.probe(st)])  # readable: accepted


def test_a_rank_that_cannot_read_the_marker_is_refused_naming_hosts_and_path(tmp_path):
    shared = tmp_path / "driver-node"
    shared.mkdir()
    st = storage.prepare(shared)
    # The learner's node: the same path is a different, empty folder (not shared storage).
    elsewhere = dataclasses.replace(st, run_dir=str(tmp_path / "learner-node"))
    p = storage.probe(elsewhere) | {"host": "learner-host", "node": "n2"}
    assert not p["ok"] and "does not exist here" in p["why"]
    with pytest.raises(RunStorageError) as info:
        storage.judge(elsewhere, [storage.probe(st) | {"node": "n1"}, p])
    msg = str(info.value)
    assert st.host in msg and "learner-host" in msg and str(tmp_path / "learner-node") in msg
    assert "rank 1" in msg and "run.storage" in msg
    # A marker there from another run (another driver's token) is refused too.
    (tmp_path / "learner-node").mkdir()
    (tmp_path / "learner-node" / storage.MARKER).write_text(
        json.dumps({"host": "old-driver", "token": "0" * 32})
    )
    p = storage.probe(elsewhere)
    assert not p["ok"] and "another run (on old-driver)" in p["why"]
    # With run.storage, ranks on one node that cannot read it are fine; on two they are not.
    remote = dataclasses.replace(elsewhere, uri=f"file://{tmp_path / 'store'}", name="r")
    storage.judge(remote, [p | {"node": "n2"}, p | {"node": "n2"}])
    with pytest.raises(RunStorageError, match="every learner rank on one node"):
        storage.judge(remote, [p | {"node": "n2"}, p | {"node": "n3"}])


def _checkpoint(root: Path, step: int, payload: bytes) -> str:
    tag = manifest.tag_for(step)
    (root / tag).mkdir(parents=True)
    (root / tag / "mp_rank_00_model_states.pt").write_bytes(payload)
    manifest.write(root / tag)
    manifest.write_latest(root, tag)
    return tag


def test_remote_checkpoints_latest_last_keep_and_fallback(tmp_path):
    local, store = tmp_path / "run" / "checkpoints", tmp_path / "store"
    store.mkdir()
    remote = storage.Remote(f"file://{store}", "run")
    assert remote.read_latest() is None and remote.tags() == []
    for step in (1, 2, 3):
        tag = _checkpoint(local, step, b"w" * step)
        remote.upload_checkpoint(local, tag, keep=2)
    assert remote.tags() == ["step_00000002", "step_00000003"]  # keep=2 remotely too
    assert remote.read_latest() == "step_00000003"
    assert (store / "run/checkpoints/step_00000003/MANIFEST.sha256.json").is_file()
    # A local copy that verifies and matches is not downloaded again.
    assert remote.fetch(local) == []
    # A fresh node: nothing local; the newest remote checkpoint is corrupt.
    fresh = tmp_path / "fresh" / "checkpoints"
    (store / "run/checkpoints/step_00000003/mp_rank_00_model_states.pt").write_bytes(b"evil")
    assert remote.fetch(fresh) == ["step_00000003", "step_00000002"]
    choice = manifest.choose(fresh)
    assert choice.tag == "step_00000002"
    note = choice.note(fresh)
    assert "resuming from step_00000002" in note and "skipped step_00000003" in note
    assert "changed since it was saved: mp_rank_00_model_states.pt" in note
    # The driver of a resume on a node without the checkpoints gets the remote marker.
    cfg = load_config(
        None,
        [f'run.out_dir="{tmp_path / "driver"}"', 'run.name="run"', f'run.storage="file://{store}"'],
    )
    assert storage.pull_latest(cfg)
    assert (tmp_path / "driver/run/checkpoints/latest").read_text() == "step_00000003"
    assert storage.has_checkpoint(tmp_path / "nowhere", f"file://{store}", "run")
    assert not storage.has_checkpoint(tmp_path / "nowhere")
    # A remote `latest` that is not a plain tag is refused.
    (store / "run/checkpoints/latest").write_text("../../etc")
    with pytest.raises(manifest.CheckpointTagError, match="not a checkpoint tag"):
        remote.fetch(fresh)
    with pytest.raises(RunStorageError, match="run.storage"):
        storage.Remote("nosuchscheme://x/y", "run")


def test_local_fallback_prune_and_bad_latest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _checkpoint(root, step, b"w" * step)
    (root / "step_00000004.partial").mkdir()  # a save that crashed
    (root / "step_00000009").mkdir()  # newer than latest: a save in flight, left alone
    assert manifest.prune(root, keep=2) == ["step_00000004.partial", "step_00000001"]
    assert manifest.complete_tags(root) == ["step_00000002", "step_00000003", "step_00000009"]
    assert manifest.choose(root).tag == "step_00000003"
    (root / "step_00000003" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert manifest.choose(root).tag == "step_00000002"
    (root / "step_00000002" / manifest.MANIFEST).unlink()
    with pytest.raises(manifest.CheckpointIntegrityError, match="no checkpoint in .* verifies"):
        manifest.choose(root)
    for bad in ("../x", "step_1/..", "a/b", ""):
        (root / "latest").write_text(bad)
        with pytest.raises(manifest.CheckpointTagError, match="not a checkpoint tag"):
            manifest.read_latest(root)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("run.keep_checkpoints=1", "run.keep_checkpoints: must be >= 2"),
        ('run.storage="bucket/prefix"', "run.storage: must be a URI"),
    ],
)
def test_config_refuses(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(None, [override])
