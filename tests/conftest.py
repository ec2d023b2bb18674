"""Shared fixtures: models built once per machine (cached under OPDPLUS_CACHE) and one local
Ray instance per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


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
