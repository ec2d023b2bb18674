"""Placing actors with a deadline: an actor Ray cannot place is an error that names it, not a
silent wait.

Ray queues an actor whose resources no node offers ("infeasible") and says so only in its own
log. ``check_feasible`` compares what an actor asks for with what the cluster's nodes offer and
fails at once when no node could ever hold it (a custom resource no node has, a GPU on a CPU
cluster, more CPUs than the largest node). ``wait_started`` waits for actors to answer their
first call (placement and start-up, engines included) for at most ``ray.placement_timeout_s``;
past it the error names the actors still waiting, what they asked for, and what the cluster
has and has free now. The driver checks every role before it builds anything (``preflight``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.errors import UserError


class PlacementError(UserError, RuntimeError):
    """An actor cannot be placed (or did not start) within its deadline; names the actor, the
    resources it asked for and what the cluster offers."""


# The config keys that set each role's resources (named in every placement error).
KEYS = {
    "learner": "learner.cpus_per_rank / gpus_per_rank / resources",
    "sampler": "rollout.sampler_cpus / sampler_gpus / sampler_resources",
    "scorer": "rollout.scorer_cpus / scorer_gpus / scorer_resources",
}


@dataclass(frozen=True)
class Ask:
    """What one actor asks Ray for: ``what`` names it (``learner-rank-0``), ``key`` is the
    config key that sets it, ``resources`` uses Ray's resource names (CPU, GPU, custom)."""

    what: str
    key: str
    resources: dict[str, float]


def ray_resources(options: dict) -> dict[str, float]:
    """Actor options (``num_cpus``, ``num_gpus``, ``memory``, ``resources``) → Ray resource names."""
    out: dict[str, float] = {}
    for opt, name in (("num_cpus", "CPU"), ("num_gpus", "GPU"), ("memory", "memory")):
        if options.get(opt):
            out[name] = float(options[opt])
    for name, amount in (options.get("resources") or {}).items():
        if amount:
            out[name] = float(amount)
    return out


def _fmt(resources: dict[str, float]) -> str:
    """``CPU = 2, GPU = 1, memory = 12.5 GiB`` (Ray's per-node and object-store entries left out)."""
    parts = []
    for k, v in sorted(resources.items()):
        if k.startswith("node:") or k == "object_store_memory":
            continue
        parts.append(f"{k} = {v / 2**30:.1f} GiB" if k == "memory" else f"{k} = {v:g}")
    return ", ".join(parts) or "nothing"


def unmet(asked: dict[str, float], nodes: list[dict[str, float]]) -> list[str]:
    """Resources of ``asked`` that no single node of ``nodes`` (each node's totals) could give:
    a name no node has, or more than the largest node has. Empty when some node fits it all."""
    if any(all(node.get(k, 0.0) >= v for k, v in asked.items()) for node in nodes):
        return []
    missing = []
    for k, v in asked.items():
        most = max((node.get(k, 0.0) for node in nodes), default=0.0)
        if most < v:
            missing.append(
                f"{k} (no node has it)" if most == 0 else f"{k} = {v:g} (largest node: {most:g})"
            )
    return missing or ["all of it on one node (no node has every resource at once)"]


def cluster_view() -> tuple[list[dict[str, float]], dict[str, float], dict[str, float]]:
    """(each alive node's total resources, cluster totals, cluster free now) from Ray."""
    import ray

    nodes = [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]
    return nodes, dict(ray.cluster_resources()), dict(ray.available_resources())


def check_feasible(asks: list[Ask], view=None) -> None:
    """Raise PlacementError at once for an ask no node of the cluster could ever hold."""
    nodes, total, _free = view or cluster_view()
    for ask in asks:
        missing = unmet(ask.resources, nodes)
        if missing:
            raise PlacementError(
                f"{ask.what} cannot be placed: it asks for {_fmt(ask.resources)} ({ask.key}) "
                f"but no node of the Ray cluster offers {'; '.join(missing)}; the cluster has "
                f"{_fmt(total)}. Change {ask.key} or add a node that offers it "
                f"(ray start --resources / --num-gpus)"
            )


def role_asks(cfg) -> list[Ask]:
    """One actor of each role the run starts, as it asks Ray (the learner ranks always; the
    samplers and scorers unless they run in-process)."""
    from services.parts import ray_options

    r, lr = cfg.rollout, cfg.learner
    roles = [("learner-rank-0", "learner", lr.cpus_per_rank, lr.gpus_per_rank, lr.resources)]
    if not r.in_process:
        roles += [
            ("student-sampler-0", "sampler", r.sampler_cpus, r.sampler_gpus, r.sampler_resources),
            ("teacher-scorer-0", "scorer", r.scorer_cpus, r.scorer_gpus, r.scorer_resources),
        ]
    return [
        Ask(what, KEYS[role], ray_resources(ray_options(cpus, gpus, custom)))
        for what, role, cpus, gpus, custom in roles
    ]


def preflight(cfg) -> None:
    """Check every role's ask against the cluster before anything is built: a resource no
    node offers fails the run at once, before the learner or any engine starts."""
    check_feasible(role_asks(cfg))


def wait_started(
    refs: list,
    asks: list[Ask],
    *,
    timeout_s: float,
    poll_s: float = 1.0,
    clock: Callable[[], float] = time.monotonic,
    view: Callable[[], tuple] | None = None,
) -> list:
    """Results of ``refs`` (each actor's first call, same order as ``asks``), waiting at most
    ``timeout_s`` for all of them; an actor still pending then, or one whose ask no node can
    hold (checked on every poll: nodes come and go), raises PlacementError naming it. An error
    raised by a call that did finish is raised as is (an engine that failed to start)."""
    import ray

    view = view or cluster_view
    deadline = clock() + timeout_s
    pending = dict(zip(refs, asks, strict=True))
    check_feasible(asks, view())  # before waiting at all: nothing that cannot start is waited on
    while pending:
        done, _ = ray.wait(
            list(pending),
            num_returns=len(pending),
            timeout=max(0.0, min(poll_s, deadline - clock())),
        )
        for ref in done:
            ray.get(ref)  # raises the start-up error of that actor, if any
            del pending[ref]
        if not pending:
            break
        snapshot = view()
        check_feasible(list(pending.values()), snapshot)
        if clock() >= deadline:
            _nodes, total, free = snapshot
            waiting = "; ".join(f"{a.what} asks for {_fmt(a.resources)}" for a in pending.values())
            keys = ", ".join(sorted({a.key for a in pending.values()}))
            raise PlacementError(
                f"not placed and started within {timeout_s:g} s (ray.placement_timeout_s): "
                f"{waiting} ({keys}); the cluster has {_fmt(total)}, free now {_fmt(free)}. "
                f"Other actors or jobs may hold what is missing; free it, lower {keys}, or "
                f"raise ray.placement_timeout_s if start-up is just slow"
            )
    return ray.get(refs)
