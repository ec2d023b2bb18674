"""Shared fixtures: models built once per machine (cached under OPDPLUS_CACHE) and one local
Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def pytest_collection_modifyitems(config, items):
    """The pure-logic tests first, then the ``slow`` ones that do not need the toy pair, then
    every test that needs it, quick ones included (each group in file order): a broken rule
    fails in the first minutes, and on a fresh clone the toy pair builds meanwhile (below)
    instead of holding up the whole run — a quick test that asked for it among the first ones
    stalled a fresh-clone run 282 s waiting for the build."""

    def group(item) -> int:
        if {"toy_pair", "toy_tool_pair"} & set(getattr(item, "fixturenames", ())):
            return 2
        return 0 if item.get_closest_marker("slow") is None else 1

    items.sort(key=group)


def pytest_sessionstart(session):
    """On a fresh clone the toy pair is not built yet (~3-6 min of SFT on two cores): start its
    build in a background process now, beside the pure-logic tests (mostly one core), instead of
    inside the first test that needs it (the calculator tool pair after it, ~1 min more).
    ``toy_pair`` and ``toy_tool_pair`` then wait on the same build locks
    (``models.common.build_lock``) and find the folders finished; if this build failed, the
    fixture builds in the foreground and shows the error. Output: ``<cache>/toy-prebuild.log``."""
    import subprocess
    import sys

    from models.common import cache_dir
    from models.toy import toy_models_cached
    from models.toy_tool import toy_tool_cached

    out = cache_dir() / "models" / "toy"
    tool_out = cache_dir() / "models" / "toy_tool"  # then the tool pair (~1 min), same process
    cached = toy_models_cached(out) and toy_tool_cached(tool_out)
    if cached or os.environ.get("OPDPLUS_NO_PREBUILD"):
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    # One torch thread: the tests beside it hold the other core, and two threads on one free
    # core ran the build 2.5-3x slower. The weights do not depend on it: a one-thread build
    # gave the same safetensors bytes (sha256) as the two-thread build in the cache.
    code = (
        "import sys, torch; torch.set_num_threads(1); from models.toy import build_toy_models;"
        " from models.toy_tool import build_toy_tool_models;"
        " build_toy_models(sys.argv[1], progress=False); build_toy_tool_models(sys.argv[2])"
    )
    log = open(cache_dir() / "toy-prebuild.log", "w")  # noqa: SIM115 — the child owns it
    session.config._toy_prebuild = subprocess.Popen(
        [sys.executable, "-c", code, str(out), str(tool_out)], stdout=log, stderr=subprocess.STDOUT
    )


def pytest_sessionfinish(session):
    proc = getattr(session.config, "_toy_prebuild", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()  # a run cut short (-x, Ctrl-C): its folder stays unbuilt, never half-written


@pytest.fixture(scope="session")
def cache_root() -> Path:
    from models.common import cache_dir

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def tiny_model(cache_root) -> Path:
    """A barely-trained tiny Llama with the project's char tokenizer (builds in seconds)."""
    from models.toy import build_tiny_model

    return Path(build_tiny_model(cache_root / "models" / "tiny", progress=False))


@pytest.fixture(scope="session")
def toy_pair(cache_root):
    """The toy teacher/student pair the demo uses (built once per machine, then cached)."""
    from models.toy import build_toy_models

    return build_toy_models(cache_root / "models" / "toy", progress=False)


@pytest.fixture(scope="session")
def toy_tool_pair(cache_root):
    """The calculator tool pair (models/toy_tool.py: ``ToolPair`` with the teacher and student
    folders and the problems' JSONL files; ~1 min to build on one core, then cached)."""
    from models.toy_tool import build_toy_tool_models

    return build_toy_tool_models(cache_root / "models" / "toy_tool")


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={
                "env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}
            },
        )
    return ray


@pytest.fixture(scope="session")
def _ray_session():
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A local Ray instance shared by the tests (started once; restarted if a test stopped it)."""
    return _ensure_ray()
