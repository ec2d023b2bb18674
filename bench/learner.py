"""The learner step at real-model scale: naive full-vocabulary log-probs vs the chunked path.

One learner step (forward, OPD+ loss, backward, AdamW step) of `learner.step.compute_loss` on
the SmolLM2 student (49,152-token vocabulary, tied output layer), for two batch sizes, with

    naive:   the model's full [B, T, V] float32 logits through `token_logprobs`
             (`logprob_chunk_size = 0`)
    chunked: `learner.logprobs` (response positions only, chunked, recomputed in backward)
    body:    reference without any output layer (loss on the hidden states), to isolate the
             memory the log-prob path adds

Each (size, path) runs in its own process. Step peak is the process's peak RSS (VmHWM) during
forward + backward of the measured steps (after a warm-up step, so AdamW's state exists),
minus the RSS before them: activations, logits and gradients. (The AdamW step itself is timed
but left out of the peak: its temporaries are the same for every path.) The logits' share is
the path's step peak minus the body's. Step time (forward, backward, AdamW) is the median over
the measured steps.

    python bench/learner.py [--sizes 8x256,16x512] [--steps 2] [--chunk 512] [--threads 1]

With --signal, the same measurement for the teacher's signal the step learns from (issue 20):

    sampled: the sampled token's teacher log-prob only (distill.teacher_topk = 0)
    top8:    the teacher's top-8 ids and log-probs (the dense path, `learner.dense`)
    full:    the teacher's final hidden states (bf16, random here) through its own output layer
             (`learner.teacher_head.load_teacher_head`, the SmolLM2 teacher's by default):
             the exact full-vocabulary D_f, chunked (`learner.teacher_head.full_batch_loss`)

at --sizes 16x64 by default, and the scorer → learner payload per response token in bytes:
one float for sampled, K ids + K floats for top-K (as today's Python lists pickle, and as
tensors), H values in the engine's dtype for the hidden states (and, for scale, the full
distribution as float32 log-probs). The teacher's output layer is resident before the step
(its MiB is reported apart from the step peak).

    python bench/learner.py --signal [--sizes 16x64] [--teacher DIR]

LoRA vs full fine-tuning (`--lora RANK`): the chunked step once training every weight and once
training rank-RANK adapters on every linear layer but the output layer (`learner.lora.attach`,
as a `learner.lora` run does). Its figure is the training memory above the weights: the peak RSS
over whole steps (forward, backward and the AdamW step, so gradients and AdamW's state count)
minus the RSS once the model is loaded.

    python bench/learner.py --lora 16 [--model .cache/models/toy/student] [--sizes 8x64]

Writes bench/results/learner-<timestamp>.json and learner-latest.json (learner-signal-* with
--signal, learner-lora-* with --lora).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, prepare_process, save

PATHS = ("body", "naive", "chunked")
SIGNALS = ("sampled", "top8", "full")
PROMPT_TOKENS = 32
TOPK = 8


def parse_size(text: str) -> tuple[int, int]:
    rows, tokens = text.lower().split("x")
    return int(rows), int(tokens)


# --------------------------------------------------------------------------- worker process


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0, proc(5)).
    Path("/proc/self/clear_refs").write_text("5")


def synthetic_batch(rows: int, response: int, vocab: int, seed: int = 0, topk: int = 0):
    """`rows` sequences of PROMPT_TOKENS + `response` random ids, with random log-probs (and a
    random teacher top-`topk` at the response columns when topk > 0)."""
    import torch

    from learner.batch import TrainBatch

    g = torch.Generator().manual_seed(seed)
    T = PROMPT_TOKENS + response
    resp_BT = torch.zeros(rows, T)
    resp_BT[:, PROMPT_TOKENS:] = 1.0
    logp = lambda: (-2.0 + 0.5 * torch.randn(rows, T, generator=g)).clamp(max=0) * resp_BT  # noqa: E731
    top = {}
    if topk:
        ids = torch.rand(rows, T, vocab, generator=g).topk(topk, -1).indices
        values = (-torch.rand(rows, T, topk, generator=g) * 4).sort(-1, descending=True).values
        top = {
            "teacher_topk_ids_BTK": ids * resp_BT.long()[..., None],
            "teacher_topk_logp_BTK": values * resp_BT[..., None],
        }
    return TrainBatch(
        input_ids_BT=torch.randint(0, vocab, (rows, T), generator=g),
        attention_mask_BT=torch.ones(rows, T, dtype=torch.long),
        response_mask_BT=resp_BT,
        logp_teacher_BT=logp(),
        logp_sampler_BT=logp(),
        versions_B=torch.zeros(rows, dtype=torch.long),
        sample_ids=tuple(f"s{i}" for i in range(rows)),
        **top,
    )


def payload_bytes(hidden: int, vocab: int, *, k: int = TOPK, tokens: int = 64) -> dict:
    """Scorer → learner bytes per response token for each teacher signal.

    *_list: as today's `ScoredRollout` fields pickle (tuples of Python floats / ints, measured
    on `tokens` positions with ids spread over the vocabulary); *_tensor: as tensors (float32
    log-probs, int32 ids); hidden_bf16: H values in the engine's bf16; full_logp_float32: the
    whole distribution as float32 log-probs, for scale.
    """
    import pickle
    import random

    rng = random.Random(0)
    floats = tuple(-rng.random() * 5 for _ in range(tokens))
    ids = tuple(tuple(rng.randrange(vocab) for _ in range(k)) for _ in range(tokens))
    logps = tuple(tuple(-rng.random() * 5 for _ in range(k)) for _ in range(tokens))
    return {
        "sampled_list": len(pickle.dumps(floats, protocol=5)) / tokens,
        "sampled_tensor": 4.0,
        f"top{k}_list": (len(pickle.dumps(ids, protocol=5)) + len(pickle.dumps(logps, protocol=5)))
        / tokens,
        f"top{k}_tensor": k * (4 + 4.0),
        "hidden_bf16": 2.0 * hidden,
        "full_logp_float32": 4.0 * vocab,
    }


def worker(
    model_dir: str,
    path: str,
    rows: int,
    response: int,
    steps: int,
    chunk: int,
    teacher_dir: str | None = None,
) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from learner.logprobs import final_hidden_states
    from learner.settings import LossSettings
    from learner.step import compute_loss, global_normaliser
    from learner.teacher_head import full_batch_loss, load_teacher_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6)
    V = model.config.vocab_size
    batch = synthetic_batch(rows, response, V, topk=TOPK if path == "top8" else 0)
    n = global_normaliser(batch, "token_mean")
    head, teacher_hidden_BTH, head_mib = None, None, 0.0
    if path == "full":
        head = load_teacher_head(teacher_dir or model_dir, vocab_size=V)
        head_mib = head.weight_VH.numel() * head.weight_VH.element_size() / 2**20
        g = torch.Generator().manual_seed(1)
        shape = (*batch.input_ids_BT.shape, head.hidden_size)
        teacher_hidden_BTH = torch.randn(shape, generator=g).to(torch.bfloat16)
    settings = LossSettings(
        divergence="js", divergence_params=(), estimator="opd_plus", discount=0.0,
        ratio_clip=10.0, is_cap=2.0, aggregation="token_mean", center_cost=True,
        temperature=0.7, logprob_chunk=0 if path == "naive" else chunk, teacher_head=None,
    )  # fmt: skip
    full_kw = dict(
        divergence="js", discount=0.0, ratio_clip=10.0, is_cap=2.0, aggregation="token_mean",
        normaliser=n, temperature=0.7, chunk_size=chunk,
    )  # fmt: skip

    def step() -> tuple[float, float, int]:
        """(step seconds, forward+backward seconds, peak RSS KiB during forward+backward)."""
        _reset_peak_rss()
        t0 = time.perf_counter()
        if path == "body":
            hidden_BTH = final_hidden_states(model, batch.input_ids_BT, batch.attention_mask_BT)
            loss = hidden_BTH.square().mean()
        elif path == "full":
            loss, _, _ = full_batch_loss(model, batch, teacher_hidden_BTH, head, **full_kw)
        else:
            loss, _ = compute_loss(model, batch, settings=settings, normaliser=n)
        loss.backward()
        del loss
        t1 = time.perf_counter()
        peak_kib = _rss_kib("VmHWM")
        optim.step()
        optim.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, t1 - t0, peak_kib

    warmup_s = step()[0]
    base_kib = _rss_kib("VmRSS")
    measured = [step() for _ in range(steps)]
    peak_kib = max(m[2] for m in measured)
    times = [m[0] for m in measured]
    return {
        "path": path,
        "rows": rows,
        "response_tokens": response,
        "prompt_tokens": PROMPT_TOKENS,
        "vocab": model.config.vocab_size,
        "chunk": chunk if path in ("chunked", *SIGNALS) else None,
        "teacher_head_mib": head_mib,
        "threads": torch.get_num_threads(),
        "warmup_s": warmup_s,
        "step_s": times,
        "step_s_median": statistics.median(times),
        "fwd_bwd_s_median": statistics.median(m[1] for m in measured),
        "base_rss_mib": base_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "step_peak_mib": (peak_kib - base_kib) / 1024,
    }


def default_student() -> Path:
    """The cached SmolLM2 student (its architecture is what matters here, not its weights)."""
    from models.common import cache_dir

    root = cache_dir() / "models" / "smollm2"
    for name in ("student", "pruned"):
        if (root / name / "config.json").is_file():
            return root / name
    raise SystemExit(f"no SmolLM2 student under {root}: run `opdplus smollm2` or pass --model")


def default_teacher() -> Path | None:
    """The cached SmolLM2 teacher (its output layer is what the full path loads), or None."""
    from models.common import cache_dir

    folder = cache_dir() / "models" / "smollm2" / "teacher"
    return folder if (folder / "config.json").is_file() else None


def run_in_subprocess(model_dir: Path, path: str, rows: int, response: int, args) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", path, "--model", str(model_dir),
        "--sizes", f"{rows}x{response}", "--steps", str(args.steps), "--chunk", str(args.chunk),
        "--threads", str(args.threads),
    ]  # fmt: skip
    if args.teacher:
        cmd += ["--teacher", str(args.teacher)]
    # Fixed malloc thresholds: large buffers are mmapped and returned to the OS when freed, so
    # RSS tracks live memory instead of glibc's cached heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"path": path, "rows": rows, "response_tokens": response,
                "error": f"exit {out.returncode}: {out.stderr[-2000:]}"}  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def figures(report: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows of the table."""
    rows = []
    for size, runs in report["sizes"].items():
        if any("error" in r for r in runs.values()):
            rows.append((f"{size}", "failed: see JSON", ""))
            continue
        for p in PATHS:
            r = runs[p]
            rows.append(
                (f"{size} {p}: step peak / time",
                 f"{r['step_peak_mib']:8.0f} MiB {r['step_s_median']:7.2f} s", "")
            )  # fmt: skip
        s = report["ratios"][size]
        rows.append((f"{size} logits' share of peak, naive / chunked",
                     f"{s['logits_mib_naive']:.0f} / {s['logits_mib_chunked']:.0f} MiB "
                     f"= {s['logits_share_cut']:.1f}x", ">= 4x"))  # fmt: skip
        rows.append((f"{size} step peak, naive / chunked", f"{s['peak_cut']:.2f}x", ""))
        rows.append((f"{size} step time, chunked / naive", f"{s['time_ratio']:.2f}x", "<= 1.1x"))
    return rows


def signal_figures(report: dict) -> list[tuple[str, str, str]]:
    """(figure, value, target) rows of the --signal table."""
    rows = [(f"payload per token: {name}", f"{value:10.1f} B", "")
            for name, value in report["payload_bytes"].items()]  # fmt: skip
    for size, runs in report["sizes"].items():
        for p in SIGNALS:
            r = runs[p]
            if "error" in r:
                rows.append((f"{size} {p}", "failed: see JSON", ""))
                continue
            rows.append(
                (f"{size} {p}: step peak / time",
                 f"{r['step_peak_mib']:8.0f} MiB {r['step_s_median']:7.2f} s", "")
            )  # fmt: skip
        if all("error" not in runs[p] for p in SIGNALS):
            full, top8 = runs["full"], runs["top8"]
            rows.append((f"{size} full: teacher output layer resident",
                         f"{full['teacher_head_mib']:8.0f} MiB", ""))  # fmt: skip
            rows.append((f"{size} step peak, full / top8",
                         f"{full['step_peak_mib'] / max(top8['step_peak_mib'], 1.0):.2f}x",
                         "full fits where top8 fits"))  # fmt: skip
    return rows


def ratios(runs: dict) -> dict:
    body, naive, chunked = (runs[p] for p in PATHS)
    logits_naive = naive["step_peak_mib"] - body["step_peak_mib"]
    logits_chunked = chunked["step_peak_mib"] - body["step_peak_mib"]
    return {
        "logits_mib_naive": logits_naive,
        "logits_mib_chunked": logits_chunked,
        "logits_share_cut": logits_naive / max(logits_chunked, 1.0),
        "peak_cut": naive["step_peak_mib"] / max(chunked["step_peak_mib"], 1.0),
        "time_ratio": chunked["step_s_median"] / naive["step_s_median"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="8x256,16x512", help="ROWSxRESPONSE_TOKENS,...")
    parser.add_argument("--steps", type=int, default=2, help="measured steps after one warm-up")
    parser.add_argument("--chunk", type=int, default=512, help="positions per output chunk")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per worker (0 = torch's default)"
    )
    parser.add_argument("--model", help="student HF folder (default: the SmolLM2 student)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--signal", action="store_true", help="sampled / top-8 / full (issue 20)")
    parser.add_argument("--lora", type=int, default=0, help="RANK > 0: LoRA vs full memory")
    parser.add_argument("--lora-worker", choices=LORA_PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help="teacher HF folder for --signal (default: SmolLM2's)")
    parser.add_argument("--worker", choices=PATHS + SIGNALS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.signal and args.sizes == parser.get_default("sizes"):
        args.sizes = "16x64"
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    prepare_process()

    if args.lora_worker:
        ((rows, response),) = sizes
        print(json.dumps(lora_worker(args, args.lora_worker, rows, response)))
        return
    if args.worker:
        ((rows, response),) = sizes
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        out = worker(args.model, args.worker, rows, response, args.steps, args.chunk, args.teacher)
        print(json.dumps(out))
        return

    if args.model is None:
        args.model = str(default_student())
    if args.signal:
        signal_main(args, [parse_size(s) for s in args.sizes.split(",")])
        return
    if args.lora:
        lora_main(args, sizes)
        return
    report = {
        "meta": {
            "model": args.model, "chunk": args.chunk, "steps": args.steps,
            "cpu_count": os.cpu_count(), "load_avg_1min_start": os.getloadavg()[0],
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "sizes": {},
        "ratios": {},
    }  # fmt: skip
    for rows, response in sizes:
        size = f"{rows}x{response}"
        runs = {}
        for path in PATHS:
            runs[path] = run_in_subprocess(Path(args.model), path, rows, response, args)
            print(f"{size} {path}: {json.dumps(runs[path])}", flush=True)
        report["sizes"][size] = runs
        if not any("error" in r for r in runs.values()):
            report["ratios"][size] = ratios(runs)
    report["meta"]["load_avg_1min_end"] = os.getloadavg()[0]
    loads = report["meta"]["load_avg_1min_start"], report["meta"]["load_avg_1min_end"]
    busy = "  -- BUSY MACHINE: times are skewed" if max(loads) > (os.cpu_count() or 1) else ""
    print(f"\nload average (1 min) start / end: {loads[0]:.1f} / {loads[1]:.1f}{busy}")
    table = figures(report)
    width = max(len(r[0]) for r in table)
    print(f"\n{'figure':<{width}}  {'value':<28}  target")
    for figure, value, target in table:
        print(f"{figure:<{width}}  {value:<28}  {target}")
    print(f"\nsaved {save(report, args.out, 'learner')}")


def signal_main(args, sizes: list[tuple[int, int]]) -> None:
    """--signal: the step's peak memory for each teacher signal, and the payload per token."""
    if args.teacher is None:
        args.teacher = default_teacher()
    config = json.loads(Path(args.teacher or args.model, "config.json").read_text())
    report = {
        "meta": {
            "model": args.model, "teacher": str(args.teacher or args.model), "chunk": args.chunk,
            "steps": args.steps, "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "payload_bytes": payload_bytes(config["hidden_size"], config["vocab_size"]),
        "sizes": {},
    }  # fmt: skip
    for rows, response in sizes:
        size = f"{rows}x{response}"
        runs = {}
        for path in SIGNALS:
            runs[path] = run_in_subprocess(Path(args.model), path, rows, response, args)
            print(f"{size} {path}: {json.dumps(runs[path])}", flush=True)
        report["sizes"][size] = runs
    table = signal_figures(report)
    width = max(len(r[0]) for r in table)
    print(f"\n{'figure':<{width}}  {'value':<28}  target")
    for figure, value, target in table:
        print(f"{figure:<{width}}  {value:<28}  {target}")
    print(f"\nsaved {save(report, args.out, 'learner-signal')}")


# --------------------------------------------------------------------------- --lora

LORA_PATHS = ("full", "lora")  # every weight trains / rank-r adapters only (learner.lora)


def lora_worker(args, path: str, rows: int, response: int) -> dict:
    """One chunked learner step, full or LoRA: peak RSS over whole steps minus the loaded RSS."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.lora import attach
    from learner.settings import LoraSettings, LossSettings
    from learner.step import compute_loss, global_normaliser

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if path == "lora":
        r = args.lora
        attach(model, LoraSettings(rank=r, alpha=2.0 * r, dropout=0.0, target_modules=()))
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(trained, lr=1e-6)
    batch = synthetic_batch(rows, response, model.config.vocab_size)
    n = global_normaliser(batch, "token_mean")
    settings = LossSettings(
        divergence="js", divergence_params=(), estimator="opd_plus", discount=0.0,
        ratio_clip=10.0, is_cap=2.0, aggregation="token_mean", center_cost=True,
        temperature=0.7, logprob_chunk=args.chunk, teacher_head=None,
    )  # fmt: skip
    loaded_kib = _rss_kib("VmRSS")
    _reset_peak_rss()
    times = []
    for _ in range(1 + args.steps):  # the first step creates AdamW's state: counted, not timed
        t0 = time.perf_counter()
        loss, _ = compute_loss(model, batch, settings=settings, normaliser=n)
        loss.backward()
        del loss
        optim.step()
        optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {
        "path": path,
        "rank": args.lora if path == "lora" else None,
        "rows": rows,
        "response_tokens": response,
        "trained_params": sum(p.numel() for p in trained),
        "threads": torch.get_num_threads(),
        "step_s_median": statistics.median(times[1:]),
        "loaded_rss_mib": loaded_kib / 1024,
        "train_peak_mib": (_rss_kib("VmHWM") - loaded_kib) / 1024,
    }


def lora_main(args, sizes: list[tuple[int, int]]) -> None:
    """--lora: the learner step's training memory, full fine-tuning vs LoRA adapters."""
    report = {
        "meta": {
            "model": args.model, "rank": args.lora, "alpha": 2.0 * args.lora,
            "targets": "every linear layer but the output layer", "chunk": args.chunk,
            "steps": args.steps, "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "sizes": {},
    }  # fmt: skip
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    table = []
    for rows, response in sizes:
        size, runs = f"{rows}x{response}", {}
        for path in LORA_PATHS:
            cmd = [
                sys.executable, __file__, "--lora-worker", path, "--lora", str(args.lora),
                "--model", str(args.model), "--sizes", size, "--steps", str(args.steps),
                "--chunk", str(args.chunk), "--threads", str(args.threads),
            ]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            runs[path] = (
                json.loads(out.stdout.strip().splitlines()[-1])
                if out.returncode == 0
                else {"path": path, "error": f"exit {out.returncode}: {out.stderr[-2000:]}"}
            )
            print(f"{size} {path}: {json.dumps(runs[path])}", flush=True)
        report["sizes"][size] = runs
        if any("error" in r for r in runs.values()):
            table.append((size, "failed: see JSON", ""))
            continue
        full, lora = runs["full"], runs["lora"]
        for p, r in runs.items():
            table.append((f"{size} {p}: trained parameters", f"{r['trained_params']:,}", ""))
            table.append((f"{size} {p}: training memory / step time",
                          f"{r['train_peak_mib']:8.0f} MiB {r['step_s_median']:7.2f} s", ""))  # fmt: skip
        cut = full["train_peak_mib"] / max(lora["train_peak_mib"], 1.0)
        table.append((f"{size} training memory, full / lora", f"{cut:.2f}x", ""))
    width = max(len(r[0]) for r in table)
    print(f"\n{'figure':<{width}}  {'value':<28}  target")
    for figure, value, target in table:
        print(f"{figure:<{width}}  {value:<28}  {target}")
    print(f"\nsaved {save(report, args.out, 'learner-lora')}")


if __name__ == "__main__":
    main()
