"""Checkpoint manifests: the SHA-256 of every file in a checkpoint folder, written when the
checkpoint is complete and checked before anything in it is loaded.

DeepSpeed loads checkpoints with ``torch.load``, i.e. pickle: a folder whose files were
replaced after saving could run arbitrary code at load time. ``verify`` refuses such a folder
(and a truncated or corrupted one) before DeepSpeed opens any of its files. Standard library
only.
"""

from __future__ import annotations

import hashlib
import json
import os
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
