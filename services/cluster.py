"""Starting or joining Ray, the run's namespace and actor names. Ray is imported only under
services/.

Three ways a run meets Ray:

- ``ray.address`` empty and no ``RAY_ADDRESS`` in the environment: start a local instance
  (dashboard and every port on 127.0.0.1).
- ``ray.address = "auto"`` or ``"HOST:PORT"``: join a running cluster (``ray start --head``).
- Launched by ``ray job submit`` (Ray sets ``RAY_ADDRESS`` for the entrypoint): join the
  cluster the job was submitted to, whatever ``ray.address`` says.

Every run's actors live in the namespace ``opdplus-<run name>``, named by role and index
(``student-sampler-0``, ``teacher-scorer-1``, ``learner-rank-0``), so the dashboard's actor list
reads as the pipeline and two runs on one cluster do not collide.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class RayInfo:
    address: str
    dashboard_url: str | None
    namespace: str = ""


def run_namespace(run_name: str) -> str:
    """Ray namespace of a run: ``opdplus-<run name>`` with characters Ray rejects replaced."""
    return "opdplus-" + (re.sub(r"[^A-Za-z0-9_.-]", "-", run_name) or "run")


def worker_env() -> dict[str, str]:
    """Environment every actor process gets (Ray 2.60 runs workers with the driver's
    interpreter, not its environment). Engine log levels follow the driver's, so that the
    quiet console stays quiet and ``--verbose`` reaches the workers too."""
    env = {
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    for key in ("OPDPLUS_CACHE", "OPDPLUS_VERBOSE", "DS_ACCELERATOR"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def _not_set_by_job(env: dict[str, str]) -> dict[str, str]:
    """Drop variables the submitted job's runtime env already sets: Ray refuses to merge a
    driver runtime env that names the same keys (and the job's values are the ones wanted)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return env
    return {k: v for k, v in env.items() if k not in job_env}


def joins_cluster(address: str) -> bool:
    """True when the run joins an existing cluster (config address, or launched as a Ray job)."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


@contextlib.contextmanager
def ray_session(
    *, address: str = "", num_cpus: int = 0, dashboard: bool = True, namespace: str = ""
) -> Iterator[RayInfo]:
    """Join ``address`` (or the cluster of the Ray job this process runs in) or start a local
    Ray instance (dashboard on 127.0.0.1) for the block, in ``namespace``."""
    import ray

    env = {"env_vars": _not_set_by_job(worker_env())}
    if ray.is_initialized():
        yield RayInfo(address="(already initialised)", dashboard_url=None)
        return
    ns = namespace or None
    if joins_cluster(address):
        # Inside `ray job submit` RAY_ADDRESS names the cluster; the job's runtime env (working
        # dir, excludes) is inherited by the actors, ours only adds the env vars.
        target = address or os.environ["RAY_ADDRESS"]
        ctx = ray.init(address=target, namespace=ns, runtime_env=env, log_to_driver=True)
    else:
        ctx = ray.init(
            num_cpus=num_cpus or None,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            # The node's address: Ray's own servers, the learner's rendezvous and the weight-sync
            # probes then listen on loopback only (a cluster node uses its real IP instead).
            _node_ip_address="127.0.0.1",
            namespace=ns,
            runtime_env=env,
            log_to_driver=True,
        )
    from services.console import route_ray_worker_logs

    route_ray_worker_logs()  # quiet console: actor output to the run's engine.log
    url = getattr(ctx, "dashboard_url", None) or None
    if url and not url.startswith("http"):
        url = "http://" + url
    info = RayInfo(
        address=ctx.address_info.get("gcs_address", address or "local"),
        dashboard_url=url,
        namespace=namespace,
    )
    try:
        yield info
    finally:
        ray.shutdown()


def actor_name(base: str) -> str:
    """``base`` if no live actor in this namespace holds that name, else ``base-<4 hex>``.

    Names are for people reading the dashboard; a second pipeline in the same namespace (tests
    that build several in one Ray session, or a name not yet released by a killed actor) gets
    a suffixed name instead of failing.
    """
    import ray

    try:
        ray.get_actor(base)
    except ValueError:
        return base
    return f"{base}-{uuid.uuid4().hex[:4]}"


def free_node_address() -> tuple[str, int]:
    """This node's IP and a port free on it now, for a TCP rendezvous (run it on that node).

    Probed on the node's own address (127.0.0.1 for a local instance), not on every interface:
    nothing a run opens should listen wider than it has to. The port is released before the
    caller binds it; another process could take it in between, which fails loudly, not hangs.
    """
    import socket

    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((ip, 0))
        port = sock.getsockname()[1]
    return ip, port
