"""Checkpoint manifests: the SHA-256 of every file in a checkpoint folder, written when the
checkpoint is complete and checked before anything in it is loaded; and the rest of what makes
a checkpoint folder durable and trustworthy: fsync of files and directories before ``latest``
moves, tags validated before they become paths, the choice of the newest checkpoint that
verifies (falling back past a corrupt one, saying why) and pruning to ``keep``.

DeepSpeed loads checkpoints with ``torch.load``, i.e. pickle: a folder whose files were
replaced after saving could run arbitrary code at load time. ``verify`` refuses such a folder
(and a truncated or corrupted one) before DeepSpeed opens any of its files. Standard library
only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from services.errors import UserError

MANIFEST = "MANIFEST.sha256.json"
_CHUNK = 1 << 20


class CheckpointIntegrityError(UserError):
    """A checkpoint folder does not match its manifest (or has none); nothing was loaded."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write(folder: str | Path) -> Path:
    """Hash every file under ``folder`` into ``folder/MANIFEST.sha256.json`` (atomically)."""
    folder = Path(folder)
    entries = {
        p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
        for p in _files(folder)
    }
    tmp = folder / f"{MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump({"version": 1, "files": entries}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    fsync_dir(folder)
    return folder / MANIFEST


def verify(folder: str | Path) -> None:
    """Raise CheckpointIntegrityError unless every file under ``folder`` is listed in its
    manifest with the same size and SHA-256, and every listed file exists."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointIntegrityError(
            f"{folder}: no {MANIFEST}; refusing to load a checkpoint that cannot be verified "
            f"(checkpoints written by opdplus carry one)"
        )
    try:
        listed = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointIntegrityError(f"{path}: unreadable manifest ({exc})") from None
    present = {p.relative_to(folder).as_posix(): p for p in _files(folder)}
    problems = []
    for name in sorted(set(listed) - set(present)):
        problems.append(f"missing {name}")
    for name in sorted(set(present) - set(listed)):
        problems.append(f"not in the manifest: {name}")
    for name in sorted(set(listed) & set(present)):
        p, want = present[name], listed[name]
        if p.stat().st_size != want["bytes"] or _sha256(p) != want["sha256"]:
            problems.append(f"changed since it was saved: {name}")
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; … {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise CheckpointIntegrityError(
            f"checkpoint {folder} does not match its manifest, nothing was loaded: {shown}"
        )


# --------------------------------------------------------------- tags, durable writes, choice

TAG_PREFIX = "step_"
PARTIAL = ".partial"
LATEST = "latest"
_TAG = re.compile(r"step_\d{1,12}")


class CheckpointTagError(UserError):
    """``latest`` names something that is not a checkpoint folder of this run."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> int:
    return int(tag[len(TAG_PREFIX) :])


def is_tag(name: str) -> bool:
    return _TAG.fullmatch(name) is not None


def read_latest(root: str | Path) -> str | None:
    """The tag ``root/latest`` names (None when there is no marker), refused with
    CheckpointTagError unless it is a plain ``step_<N>`` (no ``..``, no path separator) and
    names a folder directly under ``root`` (not a link out of it)."""
    root = Path(root)
    marker = root / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not is_tag(tag):
        raise CheckpointTagError(
            f"{marker} names {tag!r}, which is not a checkpoint tag (expected step_<N>, a "
            f"folder in {root}); refusing to use it as a path"
        )
    folder = root / tag
    if folder.is_symlink() or (folder.exists() and folder.resolve().parent != root.resolve()):
        raise CheckpointTagError(
            f"{marker} names {tag!r}, which is a link out of {root}; refusing to load it"
        )
    return tag


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that the names created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | Path) -> None:
    """fsync every file under ``folder``, then every directory bottom-up, ``folder`` last."""
    folder = Path(folder)
    dirs = [folder]
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            continue
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync_dir(d)


def write_latest(root: str | Path, tag: str) -> None:
    """Point ``root/latest`` at ``tag``: written to a temporary file, fsynced, renamed over
    the old marker, then the folder fsynced (readers see the old tag or the new, never a torn
    file; after a crash the rename has happened or not)."""
    if not is_tag(tag):
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    root = Path(root)
    tmp = root / f"{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    fsync_dir(root)


def complete_tags(root: str | Path) -> list[str]:
    """Checkpoint folders under ``root`` (``step_<N>``, not ``.partial``), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and is_tag(p.name)]
    return sorted(tags, key=tag_step)


@dataclass(frozen=True)
class Choice:
    """The checkpoint a resume loads (``tag``) and those it skipped, newest first, each with
    why (``skipped``: (tag, reason))."""

    tag: str
    skipped: tuple[tuple[str, str], ...] = ()

    def note(self, root: str | Path) -> str | None:
        """One line for the user when newer checkpoints were skipped; None when none were."""
        if not self.skipped:
            return None
        why = "; ".join(f"{tag}: {reason}" for tag, reason in self.skipped)
        return (
            f"[opdplus] resuming from {self.tag}, the newest checkpoint in {root} that "
            f"verifies; skipped {why}"
        )


def candidates(root: str | Path, latest: str, tags: list[str]) -> list[str]:
    """``latest``, then every older checkpoint, newest first. Folders newer than ``latest``
    are saves that never completed (``latest`` moves last) and are never candidates."""
    older = sorted((t for t in tags if tag_step(t) < tag_step(latest)), key=tag_step)
    return [latest, *reversed(older)]


def choose(root: str | Path) -> Choice:
    """The newest checkpoint under ``root`` that verifies, starting at the one ``latest``
    names and falling back to older ones (a folder that is missing or fails its manifest is
    skipped, with the reason). Raises FileNotFoundError without a ``latest`` marker,
    CheckpointTagError for a bad one, CheckpointIntegrityError when none verifies."""
    root = Path(root)
    latest = read_latest(root)
    if latest is None:
        raise FileNotFoundError(f"{root} has no '{LATEST}' checkpoint marker")
    skipped: list[tuple[str, str]] = []
    for tag in candidates(root, latest, complete_tags(root)):
        folder = root / tag
        if not folder.is_dir():
            skipped.append((tag, "its folder is missing"))
            continue
        try:
            verify(folder)
        except CheckpointIntegrityError as exc:
            skipped.append((tag, str(exc)))
            continue
        return Choice(tag, tuple(skipped))
    raise CheckpointIntegrityError(
        f"no checkpoint in {root} verifies, nothing was loaded: "
        + "; ".join(f"{t}: {r}" for t, r in skipped)
    )


def prune(root: str | Path, keep: int) -> list[str]:
    """Keep the newest ``keep`` checkpoints up to the one ``latest`` names that carry a
    manifest; delete older checkpoint folders and every ``.partial`` folder (a save that
    crashed). Folders newer than ``latest`` are left (a save in flight). Returns what was
    deleted. Call only once ``latest`` names a complete, manifested checkpoint."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    latest = read_latest(root)
    removed = []
    for p in root.iterdir() if root.is_dir() else ():
        if p.is_dir() and not p.is_symlink() and p.name.endswith(PARTIAL):
            shutil.rmtree(p)
            removed.append(p.name)
    if latest is None:
        return removed
    upto = [t for t in complete_tags(root) if tag_step(t) <= tag_step(latest)]
    kept = [t for t in upto if (root / t / MANIFEST).is_file()][-keep:]
    for tag in upto:
        if tag not in kept:
            shutil.rmtree(root / tag)
            removed.append(tag)
    if removed:
        fsync_dir(root)
    return removed


def verifies(folder: Path) -> bool:
    """Whether ``verify(folder)`` passes (a checkpoint usable as it is)."""
    try:
        verify(folder)
    except CheckpointIntegrityError:
        return False
    return True


PROBE_BYTES = 1 << 20  # what a failed checkpoint write must still be able to write


def write_failure(root: str | Path, exc: BaseException) -> BaseException:
    """What to raise for an error from DeepSpeed's checkpoint writer under ``root``.

    torch's writer reports a full disk as an opaque RuntimeError ("[enforce fail at
    inline_container.cc] unexpected pos …", errno lost). After such a failure, a probe write of
    1 MiB (written, fsynced, removed) in ``root`` tells a full or unwritable disk apart: its
    OSError (ENOSPC, EDQUOT, EROFS, EACCES, with the path) is returned, chained to ``exc``;
    otherwise ``exc`` itself. The checkpoint being written stays a ``.partial`` folder,
    pruned by the next save; ``latest`` still names the last complete one."""
    probe = Path(root) / ".opdplus-write-probe"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        err.filename = err.filename or str(root)
        err.__cause__ = exc
        return err
    finally:
        probe.unlink(missing_ok=True)
    return exc
