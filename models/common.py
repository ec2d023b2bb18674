"""What the model builders share: the build marker (the cache key), an exclusive build lock,
the atomic Hugging Face folder writer, and where built models are cached."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

BUILD_MARKER = "opdplus_build.json"
BUILDER_VERSION = 1  # bump when a builder's code changes what a spec produces
REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """``$OPDPLUS_CACHE`` or ``<repo>/.cache``; models live under ``<cache>/models``."""
    return Path(os.environ.get("OPDPLUS_CACHE", REPO_ROOT / ".cache"))


@contextlib.contextmanager
def build_lock(folder: Path):
    """Exclusive lock for building ``folder``: concurrent builders (tests, bench, CLI) queue up,
    and the later ones find the finished folder in the cache instead of racing to replace it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(f".{folder.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def save_model_folder(
    model, tokenizer, folder: Path, marker: dict, *, config_overrides: dict | None = None
) -> None:
    """Write a standard HF folder atomically: build in a sibling temp dir, then rename.

    marker: written to BUILD_MARKER (the cache key lives there). config_overrides: keys forced
    into config.json (e.g. an explicit rope_theta that a loader must not default).
    """
    from transformers import GenerationConfig

    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).save_pretrained(tmp)
    if config_overrides:
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        config.update(config_overrides)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (tmp / BUILD_MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
