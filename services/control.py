"""Live resizing of a running job: a named control actor holds the wanted pool sizes.

``opdplus scale RUN_DIR --samplers N --scorers M`` finds the run's control actor (by the run
name in its config.toml) and sets the target; the producer reads it about once a second and
grows or drains its pools (services/pool.py). The actor holds nothing else, so losing it loses
no work: the run then just keeps its current size. Under a collective weight sync (nccl, gloo)
the weight group is re-formed with the new samplers at the next push
(services/weight_publisher.py); a new sampler takes work once that push reached it.
"""

from __future__ import annotations

import re
from pathlib import Path

import ray

from services.errors import UserError


class ScaleError(UserError, RuntimeError):
    """The run to resize could not be found or the sizes are invalid."""


def control_name(run_name: str) -> str:
    return "rollout-control-" + re.sub(r"[^A-Za-z0-9_.-]", "_", run_name)


@ray.remote(num_cpus=0, max_restarts=-1)
class RolloutControl:
    """Wanted sizes; ``generation`` increases on every change so the producer sees each one."""

    def __init__(self) -> None:
        self.generation, self.samplers, self.scorers = 0, None, None

    def set_target(self, samplers: int | None, scorers: int | None) -> tuple:
        self.generation += 1
        self.samplers = samplers or self.samplers
        self.scorers = scorers or self.scorers
        return self.target()

    def target(self) -> tuple:
        return self.generation, self.samplers, self.scorers


def start_control(name: str):
    from services.cluster import actor_name

    return RolloutControl.options(name=actor_name(name)).remote()


def scale(
    run_dir: Path,
    *,
    samplers: int | None,
    scorers: int | None,
    timeout_s: float = 30,
    connect_timeout_s: float = 10,
):
    """Ask the running job in ``run_dir`` to run ``samplers`` samplers and ``scorers`` scorers."""
    from services.cluster import run_namespace
    from services.config import load_config

    for key, n in (("--samplers", samplers), ("--scorers", scorers)):
        if n is not None and n < 1:
            raise ScaleError(f"{key} must be >= 1, got {n}")
    if samplers is None and scorers is None:
        raise ScaleError("give --samplers and/or --scorers")
    config = Path(run_dir) / "config.toml"
    if not config.is_file():
        raise ScaleError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = load_config(config, [])
    if not ray.is_initialized():
        from services.cluster import ClusterUnreachable, check_reachable

        address = cfg.ray.address or "auto"
        try:
            # A dead address: a clear error within connect_timeout_s, not ray.init's long wait.
            check_reachable(address, timeout_s=connect_timeout_s)
            ray.init(address=address, log_to_driver=False)
        except (ConnectionError, ClusterUnreachable) as exc:
            raise ScaleError(
                f"no Ray cluster to find the job of {run_dir} in (ray.address = {address!r}): {exc}"
            ) from None
    name = control_name(cfg.run.name)
    actor = None
    for namespace in (run_namespace(cfg.run.name), None):
        try:
            actor = ray.get_actor(name, namespace=namespace)
            break
        except ValueError:
            continue
    if actor is None:
        raise ScaleError(f"no running job for {run_dir} (control actor {name!r} not found)")
    try:
        generation, s, c = ray.get(actor.set_target.remote(samplers, scorers), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ScaleError(
            f"the job of {run_dir} did not answer within {timeout_s:g} s (control actor {name!r})"
        ) from None
    return {"generation": generation, "samplers": s, "scorers": c}
