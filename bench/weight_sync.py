"""Weight-sync benchmark: seconds per weight push into a student engine, in process and
through Ray, on the toy student and the SmolLM2 student.

1. In process: ``StudentEngine.load_weights`` per push (the baseline).
2. Through Ray: ``ray.put`` of the named tensors once, then
   ``StudentSampler.load_weights.remote(ref, version)`` awaited, end to end; ``load_s`` is the
   actor's own loading time, the rest is transport. The ratio Ray / in-process is the cost of
   the object-store path over loading alone. One actor (1 CPU of a 2-CPU local Ray) per student.
3. Over gloo (``rollout.sync_backend = "gloo"``, the NCCL path with a gloo communicator): this
   process is rank 0 (``WeightSender``, as learner rank 0 is in a run), the StudentSampler
   actor (engine built with ``weight_transfer="gloo"``) rank 1; per push: stage, the packed
   broadcast and the actor's ``collective_receive_weights`` (vLLM's start / update / finish),
   awaited, end to end. The ratio gloo / Ray compares the two transports in the same run.

The pushed tensors are the model's Hugging Face-named parameters (what the learner sends),
alternately perturbed (noise of 5 % of each tensor's std) and original, ending on the
original. Sanity (``sanity_ok``): the greedy first-token log-prob of 4 probe prompts moves by
more than 1e-3 after the perturbed push and returns to within 1e-3 after the original.

Run from the repository root::

    .venv/bin/python bench/weight_sync.py                          # toy, then SmolLM2 student
    .venv/bin/python bench/weight_sync.py --quick --skip-smollm    # smoke test: tiny student

Results: a table on stdout, ``<out>/weight_sync-<timestamp>.json`` and ``-latest.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    arithmetic_prompts,
    count_params,
    cpu_state,
    engine_settings,
    open_engine,
    run,
    smollm_pair,
    toy_pair,
)

NAME = "weight_sync"
LOGP_CHANGED = 1e-3  # a push of perturbed weights must move a probe log-prob by more than this
PERTURB_SCALE = 0.05  # noise std added to each pushed tensor, relative to the tensor's std


@dataclass(frozen=True)
class Sizes:
    pushes: int = 4


QUICK = Sizes(pushes=2)


def named_weights(model_dir: Path, dtype: str, *, perturb_seed: int | None) -> list:
    """The model's HF-named parameters (what the learner pushes), optionally with added noise."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    del model
    if perturb_seed is None:
        return named
    gen = torch.Generator().manual_seed(perturb_seed)
    return [
        (
            n,
            t
            + PERTURB_SCALE
            * t.float().std().to(t.dtype)
            * torch.randn(t.shape, generator=gen).to(t.dtype),
        )
        for n, t in named
    ]


def push_pattern(model_dir: Path, dtype: str, pushes: int) -> list[tuple[str, list]]:
    """Alternate perturbed and original weights, ending on the original (for the restore check)."""
    perturbed = named_weights(model_dir, dtype, perturb_seed=1)
    original = named_weights(model_dir, dtype, perturb_seed=None)
    n = max(2, pushes + pushes % 2)
    return [("perturbed", perturbed) if i % 2 == 0 else ("original", original) for i in range(n)]


def timed_pushes(generate, push, pattern: list[tuple[str, list]]) -> tuple[list, dict]:
    """Push every entry of ``pattern``; return push()'s results and the log-prob sanity check.

    ``generate()`` returns the probe prompts' greedy generations; their first-token log-probs
    are the weights' fingerprint.
    """

    def fingerprint() -> list[float]:
        return [g[0].logprobs[0] for g in generate()]

    def max_diff(a: list[float], b: list[float]) -> float:
        return max(abs(x - y) for x, y in zip(a, b, strict=True))

    before = fingerprint()
    results, changed = [], None
    for kind, named in pattern:
        results.append(push(named))
        if kind == "perturbed" and changed is None:
            changed = max_diff(before, fingerprint())
    restored = max_diff(before, fingerprint())
    return results, {
        "logp_change_after_perturbed_push": changed,
        "logp_diff_after_restoring_push": restored,
        "sanity_ok": changed > LOGP_CHANGED and restored < LOGP_CHANGED,
    }


def inprocess_sync(settings, probe: list[list[int]], pushes: int) -> dict:
    """Time ``StudentEngine.load_weights`` per push in this process."""
    from rollout.engine import StudentEngine

    model_dir = Path(settings.model_path)
    pattern = push_pattern(model_dir, settings.dtype, pushes)
    with open_engine(StudentEngine, settings) as (engine, _):
        times, sanity = timed_pushes(
            lambda: engine.generate(probe, max_tokens=2, temperature=0.0),
            lambda named: engine.load_weights(named, engine.version + 1),
            pattern,
        )
        state = cpu_state()
    return {
        "path": "in-process",
        "model": str(model_dir),
        "params": count_params(model_dir),
        "tensors": len(pattern[0][1]),
        "dtype": settings.dtype,
        "pushes": len(times),
        "push_s": times,
        "median_s": statistics.median(times),
        **sanity,
        **state,
    }


def ray_sync(settings, probe: list[list[int]], pushes: int) -> dict:
    """A StudentSampler actor receives each push through the object store, timed end to end."""
    # Ray outside services/: this figure times the raw calls the weight publisher makes.
    import ray

    from services.actors import StudentSampler

    t0 = time.perf_counter()
    actor = StudentSampler.options(num_cpus=1).remote(settings)
    version = ray.get(actor.version.remote())
    start_s = time.perf_counter() - t0
    pattern = push_pattern(Path(settings.model_path), settings.dtype, pushes)

    def push(named) -> dict:
        nonlocal version
        version += 1
        t1 = time.perf_counter()
        ref = ray.put(named)
        put_s = time.perf_counter() - t1
        served, load_s = ray.get(actor.load_weights.remote(ref, version))
        total_s = time.perf_counter() - t1
        if served != version:
            raise RuntimeError(f"sampler serves version {served} after pushing {version}")
        return {"put_s": put_s, "load_s": load_s, "total_s": total_s}

    rows, sanity = timed_pushes(
        lambda: ray.get(actor.generate.remote(probe, max_tokens=2, temperature=0.0)),
        push,
        pattern,
    )
    ray.kill(actor)
    return {
        "path": "ray object store -> StudentSampler actor",
        "model": settings.model_path,
        "params": count_params(Path(settings.model_path)),
        "bytes": sum(t.numel() * t.element_size() for _, t in pattern[0][1]),
        "dtype": settings.dtype,
        "actor_num_cpus": 1,
        "ray_num_cpus": 2,
        "actor_start_s": start_s,
        "pushes": rows,
        "median_total_s": statistics.median(r["total_s"] for r in rows),
        "median_load_s": statistics.median(r["load_s"] for r in rows),
        "median_transport_s": statistics.median(r["total_s"] - r["load_s"] for r in rows),
        **sanity,
    }


def gloo_sync(settings, probe: list[list[int]], pushes: int) -> dict:
    """A StudentSampler actor receives each push by gloo broadcast from this process."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    # Ray outside services/: this figure times the raw calls services/nccl_sync.py makes.
    import ray

    from rollout.weight_transfer import WeightSender
    from services.actors import StudentSampler
    from services.cluster import free_node_address

    settings = dataclasses.replace(settings, weight_transfer="gloo")
    t0 = time.perf_counter()
    actor = StudentSampler.options(num_cpus=1).remote(settings)
    version = ray.get(actor.version.remote())
    start_s = time.perf_counter() - t0
    host, port = free_node_address()
    t0 = time.perf_counter()
    joined = actor.collective_init_receiver.remote(host, port, 1, 2)
    with ThreadPoolExecutor(1) as pool:  # the sender blocks until the actor has joined
        sender = pool.submit(WeightSender, host, port, 2, backend="gloo", dtype=settings.dtype)
        ray.get(joined)
        sender = sender.result()
    setup_s = time.perf_counter() - t0
    pattern = push_pattern(Path(settings.model_path), settings.dtype, pushes)

    def push(named) -> dict:
        nonlocal version
        version += 1
        t1 = time.perf_counter()
        meta = sender.stage(named)
        received = actor.collective_receive_weights.remote(meta, version)
        send_s = sender.send_staged()
        served, receive_s = ray.get(received)
        total_s = time.perf_counter() - t1
        if served != version:
            raise RuntimeError(f"sampler serves version {served} after pushing {version}")
        return {"send_s": send_s, "receive_s": receive_s, "total_s": total_s}

    rows, sanity = timed_pushes(
        lambda: ray.get(actor.generate.remote(probe, max_tokens=2, temperature=0.0)),
        push,
        pattern,
    )
    ray.get(actor.collective_close_receiver.remote())
    sender.close()
    ray.kill(actor)
    return {
        "path": "gloo broadcast (vLLM weight-transfer engine) -> StudentSampler actor",
        "model": settings.model_path,
        "dtype": settings.dtype,
        "actor_num_cpus": 1,
        "ray_num_cpus": 2,
        "actor_start_s": start_s,
        "group_setup_s": setup_s,
        "pushes": rows,
        "median_total_s": statistics.median(r["total_s"] for r in rows),
        "median_receive_s": statistics.median(r["receive_s"] for r in rows),
        **sanity,
    }


def measure(report: dict, sizes: Sizes, args: argparse.Namespace) -> None:
    from services.cluster import ray_session

    toy = toy_pair(args.quick)
    students = [(toy.name, toy.student_dir, "float32", 128, 256)]
    smol, skipped = smollm_pair(args.skip_smollm)
    if smol is None:
        report["skipped"] = {"smollm2": skipped}
    else:
        students.append(("smollm2", smol.student_dir, "bfloat16", 1024, 512))
    sync = report["weight_sync"] = {}
    # In-process engines first, each closed before the next starts and before Ray's actors.
    for name, folder, dtype, kv_mb, max_len in students:
        settings = engine_settings(folder, dtype=dtype, kv_cache_mb=kv_mb, max_model_len=max_len)
        probe = arithmetic_prompts(folder, 4)
        sync[name] = {"in_process": inprocess_sync(settings, probe, sizes.pushes)}
    with ray_session(num_cpus=2, dashboard=False):
        for name, folder, dtype, kv_mb, max_len in students:
            # A smaller KV cache for the actor, beside Ray's own processes; a push's cost
            # does not depend on it.
            settings = engine_settings(
                folder, dtype=dtype, kv_cache_mb=min(kv_mb, 256), max_model_len=max_len
            )
            ray_fig = ray_sync(settings, arithmetic_prompts(folder, 4), sizes.pushes)
            sync[name]["ray"] = ray_fig
            sync[name]["ray_over_in_process"] = (
                ray_fig["median_total_s"] / sync[name]["in_process"]["median_s"]
            )
            gloo_fig = gloo_sync(settings, arithmetic_prompts(folder, 4), sizes.pushes)
            sync[name]["gloo"] = gloo_fig
            sync[name]["gloo_over_ray"] = gloo_fig["median_total_s"] / ray_fig["median_total_s"]


def table(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name, s in report.get("weight_sync", {}).items():
        inproc, ray, gloo = s["in_process"], s["ray"], s["gloo"]
        ok = inproc["sanity_ok"] and ray["sanity_ok"] and gloo["sanity_ok"]
        rows.append(
            (
                f"weight push {name}, {inproc['params'] / 1e6:.1f} M params: in process "
                f"{inproc['median_s'] * 1e3:.0f} ms, through Ray {ray['median_total_s'] * 1e3:.0f}"
                f" ms (actor load {ray['median_load_s'] * 1e3:.0f} ms), over gloo "
                f"{gloo['median_total_s'] * 1e3:.0f} ms (actor receive "
                f"{gloo['median_receive_s'] * 1e3:.0f} ms)",
                f"Ray {s['ray_over_in_process']:.1f}x in-process, gloo {s['gloo_over_ray']:.2f}x Ray",
                "sanity ok" if ok else "SANITY FAILED",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    quick_help = "tiny student, 2 pushes (smoke test)"
    run(NAME, __doc__, measure, table, (Sizes(), QUICK), quick_help, smollm=True, argv=argv)


if __name__ == "__main__":
    main()
