"""Starting or joining Ray. Ray is imported only under services/."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class RayInfo:
    address: str
    dashboard_url: str | None


@contextlib.contextmanager
def ray_session(
    *, address: str = "", num_cpus: int = 0, dashboard: bool = True
) -> Iterator[RayInfo]:
    """Join ``address`` or start a local Ray instance (dashboard on 127.0.0.1) for the block."""
    import ray

    # Ray 2.60 runs workers with the driver's interpreter; keep vLLM quiet in them.
    env = {
        "env_vars": {
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
            "TOKENIZERS_PARALLELISM": "false",
        }
    }
    if ray.is_initialized():
        yield RayInfo(address="(already initialised)", dashboard_url=None)
        return
    if address:
        ctx = ray.init(address=address, runtime_env=env, log_to_driver=True)
    else:
        ctx = ray.init(
            num_cpus=num_cpus or None,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            runtime_env=env,
            log_to_driver=True,
        )
    url = getattr(ctx, "dashboard_url", None) or None
    if url and not url.startswith("http"):
        url = "http://" + url
    info = RayInfo(
        address=ctx.address_info.get("gcs_address", address or "local"),
        dashboard_url=url,
    )
    try:
        yield info
    finally:
        ray.shutdown()
