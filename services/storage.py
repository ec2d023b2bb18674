"""One run storage: every process of a run reads and writes the same run directory.

The driver resolves ``run.out_dir`` to an absolute path once (``resolve_run_dir``), writes a
marker there (``.opdplus-run``: its host name and a random token, ``prepare``) and hands the
absolute path to the learner. Every learner rank reads that marker before training starts
(``probe``); a rank that cannot (the path is local to the driver's node, or another run's) stops
the run with a message naming both hosts and the path (``judge``).

For clusters whose nodes share no filesystem, ``run.storage`` is a URI that ``pyarrow.fs``
understands (``s3://``, ``gs://``, ``hdfs://``, ``file://``; the layer Ray Train uses):
checkpoints are written on the learner's node under the same absolute path, then copied to
``<storage>/<run name>/checkpoints/<tag>`` (``latest`` last), and the final student to
``<storage>/<run name>/student``; ``--resume`` downloads the newest checkpoint there that
verifies (``Remote``). The learner ranks then share one node's disk (checked).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
from dataclasses import dataclass, replace
from pathlib import Path

from learner import manifest
from services.errors import UserError

MARKER = ".opdplus-run"


class RunStorageError(UserError):
    """The run directory is not storage that every process of the run can reach."""


@dataclass(frozen=True)
class RunStorage:
    """What a learner rank needs to find the run: the absolute run directory, who prepared it
    (the driver's host and the marker's token) and the optional remote URI (``run.storage``)."""

    run_dir: str
    host: str
    token: str
    uri: str = ""
    name: str = ""

    def remote(self) -> Remote | None:
        return Remote(self.uri, self.name) if self.uri else None


def resolve_run_dir(out_dir: str | Path, name: str) -> Path:
    """``out_dir/name`` as an absolute path, against this process's working directory (the
    driver's, once); ``~`` expanded, symbolic links kept (they may differ between nodes)."""
    return Path(os.path.abspath(os.path.expanduser(str(out_dir)))) / name


def absolute_out_dir(cfg):
    """``cfg`` with ``run.out_dir`` made absolute: the config stored in the run directory
    names the run wherever ``--resume`` is started from."""
    out = os.path.abspath(os.path.expanduser(cfg.run.out_dir))
    return replace(cfg, run=replace(cfg.run, out_dir=out))


def has_checkpoint(run_dir: Path, uri: str = "", name: str = "") -> bool:
    """A checkpoint to resume from: ``latest`` in the run directory or in ``run.storage``."""
    if (Path(run_dir) / "checkpoints" / manifest.LATEST).is_file():
        return True
    return bool(uri) and Remote(uri, name).read_latest() is not None


def prepare(run_dir: Path, *, uri: str = "", name: str = "") -> RunStorage:
    """Write the run marker (host, random token) into ``run_dir`` durably, say where the run
    lives, and return what the learner needs (``RunStorage``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_absolute():
        raise ValueError(f"the run directory must be absolute, got {run_dir}")
    storage = RunStorage(
        run_dir=str(run_dir),
        host=socket.gethostname(),
        token=secrets.token_hex(16),
        uri=uri,
        name=name or run_dir.name,
    )
    if uri:
        storage.remote()  # a URI pyarrow cannot open is refused before anything starts
    body = {"host": storage.host, "token": storage.token, "path": str(run_dir), "pid": os.getpid()}
    tmp = run_dir / f"{MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run_dir / MARKER)
    manifest.fsync_dir(run_dir)
    from services.console import say

    also = f"; checkpoints and the student are copied to {storage.remote().uri}" if uri else ""
    say(f"[opdplus] run directory: {run_dir}{also}")
    return storage


def for_run(run_dir: Path, *, uri: str = "", name: str = "") -> RunStorage:
    """The ``RunStorage`` of the marker ``prepare`` wrote into ``run_dir`` (driver side)."""
    path = Path(run_dir) / MARKER
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunStorageError(f"{path}: cannot read the run marker ({exc})") from None
    return RunStorage(
        run_dir=str(run_dir),
        host=body["host"],
        token=body["token"],
        uri=uri,
        name=name or Path(run_dir).name,
    )


def probe(storage: RunStorage) -> dict:
    """Run on a learner rank: this host, this Ray node, and whether the driver's marker is
    readable here with the driver's token (``ok``; ``why`` says what went wrong)."""
    path = Path(storage.run_dir) / MARKER
    out = {"host": socket.gethostname(), "node": _node_id(), "cwd": os.getcwd(), "ok": False}
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        out["why"] = f"{path} does not exist here"
        return out
    except (OSError, ValueError) as exc:
        out["why"] = f"{path} is unreadable here ({exc})"
        return out
    if body.get("token") != storage.token:
        out["why"] = (
            f"{path} here was written by another run (on {body.get('host', '?')}), not by "
            f"this driver"
        )
        return out
    out["ok"] = True
    return out


def judge(storage: RunStorage, probes: list[dict]) -> None:
    """Refuse a run whose learner ranks cannot use the run directory the driver prepared.

    Without ``run.storage`` every rank must read the driver's marker (the run directory is one
    shared folder). With it, ranks that cannot are fine as long as they share one node (their
    checkpoint shards meet on its disk before they are copied to the URI).
    """
    bad = [(i, p) for i, p in enumerate(probes) if not p["ok"]]
    if not bad:
        return
    if storage.uri and len({p["node"] for p in probes}) == 1:
        return
    i, p = bad[0]
    if storage.uri:
        raise RunStorageError(
            f"run.storage = {storage.uri!r} needs every learner rank on one node or a run "
            f"directory every node shares: learner rank {i} on {p['host']} cannot read "
            f"{storage.run_dir}/{MARKER} ({p['why']}) and the ranks run on "
            f"{len({q['node'] for q in probes})} nodes"
        )
    raise RunStorageError(
        f"{storage.run_dir} is not storage that the driver (on {storage.host}) and learner "
        f"rank {i} (on {p['host']}) share: {p['why']}. Mount one filesystem at that path on "
        f"every node (deploy/README.md: the runs volume) and point run.out_dir at it, or set "
        f"run.storage to a URI every node can reach (s3://bucket/prefix, gs://…)"
    )


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # outside a Ray worker
        return ""


class Remote:
    """``<uri>/<name>`` through ``pyarrow.fs``: checkpoints under ``checkpoints/`` (``latest``
    written last) and the final student under ``student/``."""

    def __init__(self, uri: str, name: str) -> None:
        try:
            from pyarrow import fs as pafs
        except ImportError:
            raise RunStorageError(
                f"run.storage = {uri!r} needs pyarrow (pip install pyarrow)"
            ) from None
        self._fs = pafs
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # ArrowInvalid, OSError, a missing credential …
            raise RunStorageError(
                f"run.storage = {uri!r} is not a storage URI pyarrow can open ({exc}); "
                f"expected e.g. s3://bucket/prefix, gs://bucket/prefix or file:///abs/path"
            ) from None
        self.root = f"{base.rstrip('/')}/{name}"
        self.uri = f"{uri.rstrip('/')}/{name}"

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _is(self, path: str, kind) -> bool:
        return self.fs.get_file_info(path).type == kind

    def _write_text(self, path: str, text: str) -> None:
        # One PUT is atomic on object stores; on a local filesystem write then rename.
        local = isinstance(self.fs, self._fs.LocalFileSystem)
        target = f"{path}.tmp" if local else path
        with self.fs.open_output_stream(target) as f:
            f.write(text.encode())
        if local:
            self.fs.move(target, path)

    def read_latest(self) -> str | None:
        path = self._path("checkpoints", manifest.LATEST)
        if not self._is(path, self._fs.FileType.File):
            return None
        with self.fs.open_input_stream(path) as f:
            tag = f.read().decode().strip()
        if not manifest.is_tag(tag):
            raise manifest.CheckpointTagError(
                f"{self.uri}/checkpoints/latest names {tag!r}, which is not a checkpoint tag "
                f"(expected step_<N>); refusing to use it as a path"
            )
        return tag

    def tags(self) -> list[str]:
        selector = self._fs.FileSelector(self._path("checkpoints"), allow_not_found=True)
        infos = self.fs.get_file_info(selector)
        names = [
            i.base_name
            for i in infos
            if i.type == self._fs.FileType.Directory and manifest.is_tag(i.base_name)
        ]
        return sorted(names, key=manifest.tag_step)

    def _upload_dir(self, local: Path, dest: str) -> None:
        if self._is(dest, self._fs.FileType.Directory):
            self.fs.delete_dir(dest)  # a folder left by an earlier, interrupted upload
        self.fs.create_dir(dest, recursive=True)
        self._fs.copy_files(
            str(local),
            dest,
            source_filesystem=self._fs.LocalFileSystem(),
            destination_filesystem=self.fs,
        )

    def upload_checkpoint(self, local_root: Path, tag: str, keep: int | None) -> None:
        """Copy ``local_root/tag`` up, then point the remote ``latest`` at it, then keep the
        newest ``keep`` remote checkpoints up to it."""
        self._upload_dir(Path(local_root) / tag, self._path("checkpoints", tag))
        self._write_text(self._path("checkpoints", manifest.LATEST), tag)
        if keep:
            upto = [t for t in self.tags() if manifest.tag_step(t) <= manifest.tag_step(tag)]
            for old in upto[:-keep]:
                self.fs.delete_dir(self._path("checkpoints", old))

    def upload_student(self, local: Path) -> None:
        self._upload_dir(Path(local), self._path("student"))

    def _same_manifest(self, tag: str, folder: Path) -> bool:
        path = self._path("checkpoints", tag, manifest.MANIFEST)
        if not (folder / manifest.MANIFEST).is_file() or not self._is(path, self._fs.FileType.File):
            return False
        with self.fs.open_input_stream(path) as f:
            return f.read() == (folder / manifest.MANIFEST).read_bytes()

    def fetch(self, local_root: Path) -> list[str]:
        """Make the newest remote checkpoint that verifies available under ``local_root``:
        ``latest`` first, then older ones, each downloaded unless a local copy verifies; the
        local ``latest`` then names the remote one, so ``manifest.choose`` on ``local_root``
        skips what was skipped here, with the reason. Returns the tags downloaded."""
        local_root = Path(local_root)
        latest = self.read_latest()
        if latest is None:
            raise FileNotFoundError(f"{self.uri}/checkpoints has no 'latest' checkpoint marker")
        local_root.mkdir(parents=True, exist_ok=True)
        remote_tags = self.tags()
        fetched = []
        for tag in manifest.candidates(local_root, latest, remote_tags):
            folder = local_root / tag
            if folder.is_dir() and self._same_manifest(tag, folder) and manifest.verifies(folder):
                break
            if tag not in remote_tags:
                continue
            staging = local_root / f"{tag}{manifest.PARTIAL}"  # pruned if this stops half-way
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()  # copy_files creates sub-folders, not the destination itself
            self._fs.copy_files(
                self._path("checkpoints", tag),
                str(staging),
                source_filesystem=self.fs,
                destination_filesystem=self._fs.LocalFileSystem(),
            )
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
            fetched.append(tag)
            if manifest.verifies(folder):
                break
        manifest.write_latest(local_root, latest)
        return fetched


def pull_latest(cfg) -> bool:
    """``--resume`` with ``run.storage`` where the run directory here has no checkpoint marker
    (the learner's node kept the checkpoints, or they live only in the URI): copy the remote
    ``latest`` down, so the resume check finds it; the learner downloads the checkpoint
    itself. True when a marker was copied."""
    if not cfg.run.storage:
        return False
    local = resolve_run_dir(cfg.run.out_dir, cfg.run.name) / "checkpoints"
    if (local / manifest.LATEST).is_file():
        return False
    tag = Remote(cfg.run.storage, cfg.run.name).read_latest()
    if tag is None:
        return False
    local.mkdir(parents=True, exist_ok=True)
    manifest.write_latest(local, tag)
    return True
