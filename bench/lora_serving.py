"""LoRA serving benchmark: how a LoRA student's new weights reach a vLLM sampler — merged
weights (the product's path) vs vLLM's LoRA adapter path — on the CPU build.

Both paths start from the same learner-side peft model (the student with rank-R adapters on
every linear layer but the output layer, `learner.lora.attach`), whose adapters get new
random values (seeded, B ~ 0.02·N(0, 1)) before each push:

    merged  (today):  `learner.lora.merged_weights` (W + (alpha / r)·B·A for every base tensor)
                      → `StudentEngine.load_weights` (vLLM's reload_weights of the whole model)
    adapter (vLLM):   `learner.lora.adapter_weights` → `learner.lora.save_adapter` (the peft
                      folder, on local disk: vLLM loads adapters from a path only)
                      → `LLM.llm_engine.add_lora(LoRARequest(..., load_inplace=True))` on an
                      engine started with `enable_lora=True, max_lora_rank=R`; requests then
                      carry the LoRARequest

Figures per student (toy, then SmolLM2), each side in the same run:

* push_s: learner tensors → the engine holds the new weights (the two steps above);
* served_s: push_s + the first greedy 1-token generation of one probe prompt after it (vLLM
  activates an adapter into its LoRA slots on the first batch that uses it, so that cost is
  inside served_s, not push_s);
* tokens/s of sampling (temperature 1, seeded per prompt, batch x new tokens, one warm-up
  excluded), the adapter engine with the adapter on every request;
* start_s of each engine; bytes handed over per push (merged float32 tensors vs adapter file);
* agreement: max |Δ log p| of the probes' greedy tokens between the two engines after the
  last push, and of each against the peft model in transformers (float32); and that the push
  moved them (sanity: the adapters are live, not zero). Sampled-token log-probs: prompt
  log-probs with an adapter fail on the CPU build (see `greedy`).

Ratios are adapter / merged (push_s, served_s: > 1 means the adapter path is slower;
tokens/s: < 1 means it samples slower).

vLLM is imported here directly (outside rollout/engine.py): the adapter engine is the path this
benchmark measures, not a path of the product. Run from the repository root, under the heavy
lock on a shared machine::

    flock /tmp/opdplus-heavy.lock .venv/bin/python bench/lora_serving.py     # toy + SmolLM2
    .venv/bin/python bench/lora_serving.py --quick --skip-smollm             # smoke test

Results: a table on stdout, ``<out>/lora_serving-<timestamp>.json`` and ``-latest.json``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    arithmetic_prompts,
    count_params,
    cpu_state,
    open_engine,
    run,
    smollm_engine_settings,
    smollm_pair,
    toy_engine_settings,
    toy_pair,
)

NAME = "lora_serving"
B_SCALE = 0.02  # std of each pushed adapter's B (A keeps peft's init): a delta the log-probs show
LOGP_CHANGED = 1e-3  # a push must move a probe's greedy log-probs by more than this
GREEDY_TOKENS = 8  # greedy tokens per probe whose log-probs are compared


@dataclass(frozen=True)
class Sizes:
    rank: int = 16
    pushes: int = 3
    batch: int = 32
    new_tokens: int = 32
    probes: int = 4


QUICK = Sizes(rank=8, pushes=2, batch=8, new_tokens=8, probes=2)


def peft_student(model_dir: Path, rank: int):
    """(HF model with adapters injected, its peft wrapper): the learner's side, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.lora import attach
    from learner.settings import LoraSettings

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    lora = LoraSettings(rank=rank, alpha=2.0 * rank, dropout=0.0, target_modules=())
    return model, attach(model, lora)


def new_adapters(model, seed: int) -> None:
    """Give every lora_B a fresh seeded value (peft starts it at zero: no delta)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(B_SCALE * torch.randn(p.shape, generator=gen))


def hf_logprobs(model, seqs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
    """log p(response token | before) of each (prompt, response) under the peft model (float32)."""
    import torch

    out = []
    with torch.no_grad():
        for prompt, response in seqs:
            ids = prompt + response
            logits = model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            out.append(logp.gather(1, torch.tensor(response)[:, None])[:, 0].tolist())
    return out


def greedy(llm, probes: list[list[int]], tokens: int, lora=None) -> list[tuple[list, list]]:
    """(token ids, log-probs) of each probe's greedy continuation. Sampled-token log-probs, not
    prompt log-probs: vLLM 0.32's CPU LoRA logits path fails on prompt log-probs (an einsum
    shape error in PunicaWrapperCPU.add_lora_logits, one index per request against one row per
    prompt token)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=tokens, temperature=0.0, logprobs=0, detokenize=False)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in probes],
        params,
        lora_request=lora,
        use_tqdm=False,
    )
    rows = []
    for o in outs:
        c = o.outputs[0]
        ids = list(c.token_ids)
        rows.append((ids, [entry[t].logprob for t, entry in zip(ids, c.logprobs, strict=True)]))
    return rows


def logp_diff(a: list[tuple[list, list]], b: list[tuple[list, list]]) -> float:
    """Max |Δ log p| over the tokens both greedy continuations share (up to the first
    differing token of each probe)."""
    worst = 0.0
    for (ids_a, lp_a), (ids_b, lp_b) in zip(a, b, strict=True):
        for ta, tb, x, y in zip(ids_a, ids_b, lp_a, lp_b, strict=False):
            if ta != tb:
                break
            worst = max(worst, abs(x - y))
    return worst


def timed_sampling(llm, prompts: list[list[int]], new_tokens: int, lora=None) -> dict:
    """Temperature-1 sampling, seeded per prompt as the samplers do; one warm-up excluded."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def params(tokens: int, seed: int):
        return [
            SamplingParams(
                temperature=1.0, max_tokens=tokens, logprobs=0, seed=seed + i, detokenize=False
            )
            for i in range(len(prompts))
        ]

    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(inputs, params(min(8, new_tokens), 1), lora_request=lora, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(inputs, params(new_tokens, 2), lora_request=lora, use_tqdm=False)
    seconds = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"generated_tokens": generated, "seconds": seconds, "tokens_per_s": generated / seconds}


def probe_once(llm, probe: list[int], lora=None) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm.generate(
        [TokensPrompt(prompt_token_ids=probe)],
        SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
        lora_request=lora,
        use_tqdm=False,
    )
    return time.perf_counter() - t0


def lora_request(folder: Path):
    """The request that (re)loads the adapter in `folder` as adapter 1, replacing the last."""
    # imported after rollout.engine, which sets vLLM's in-process mode before vLLM loads
    from vllm.lora.request import LoRARequest

    return LoRARequest("student", 1, str(folder), load_inplace=True)


def adapter_engine(settings, rank: int):
    """An LLM like the StudentEngine's (same model, dtype, memory, lengths, log-prob mode),
    started with vLLM's LoRA support."""
    from rollout.engine import _start_llm

    return _start_llm(
        settings,
        max_logprobs=20,
        logprobs_mode="processed_logprobs",
        enable_lora=True,
        max_lora_rank=rank,
        max_loras=1,
    )


def measure_student(student_dir: Path, settings, sizes: Sizes, prompts, probes) -> dict:

    from learner.lora import adapter_weights, merged_weights, save_adapter
    from rollout.engine import StudentEngine

    model, peft_model = peft_student(student_dir, sizes.rank)
    folder = Path(tempfile.mkdtemp(prefix="opdplus-lora-serving-"))
    merged_rows, adapter_rows = [], []
    with open_engine(StudentEngine, settings) as (engine, merged_start_s):
        t0 = time.perf_counter()
        llm = adapter_engine(settings, sizes.rank)
        adapter_start_s = time.perf_counter() - t0
        try:
            base = greedy(engine.llm, probes, GREEDY_TOKENS)
            lora = None
            for push in range(1, sizes.pushes + 1):
                new_adapters(model, seed=push)
                # merged: what LearnerEngine.export_weights hands the publisher, then the load
                t1 = time.perf_counter()
                named = merged_weights(model)
                t2 = time.perf_counter()
                engine.load_weights(named, engine.version + 1)
                t3 = time.perf_counter()
                first = probe_once(engine.llm, probes[0])
                merged_rows.append(
                    {
                        "export_s": t2 - t1,
                        "load_s": t3 - t2,
                        "push_s": t3 - t1,
                        "first_probe_s": first,
                        "served_s": t3 - t1 + first,
                        "bytes": sum(t.numel() * t.element_size() for _, t in named),
                    }
                )
                # adapter: the peft folder on disk, then vLLM loads it in place of the last
                t1 = time.perf_counter()
                adapters = adapter_weights(model)
                save_adapter(peft_model, folder, adapters)
                t2 = time.perf_counter()
                lora = lora_request(folder)
                if not llm.llm_engine.add_lora(lora):
                    raise RuntimeError("vLLM did not load the adapter")
                t3 = time.perf_counter()
                first = probe_once(llm, probes[0], lora)
                adapter_rows.append(
                    {
                        "export_s": t2 - t1,
                        "load_s": t3 - t2,
                        "push_s": t3 - t1,
                        "first_probe_s": first,
                        "served_s": t3 - t1 + first,
                        "bytes": sum(f.stat().st_size for f in folder.iterdir()),
                    }
                )
            merged_out = greedy(engine.llm, probes, GREEDY_TOKENS)
            adapter_out = greedy(llm, probes, GREEDY_TOKENS, lora)
            seqs = [(p, ids) for p, (ids, _) in zip(probes, merged_out, strict=True)]
            hf_out = [
                (ids, lp) for (_, ids), lp in zip(seqs, hf_logprobs(model, seqs), strict=True)
            ]
            # the same probe once nothing is new (for scale: what the first one adds)
            steady = {
                "merged": statistics.median(probe_once(engine.llm, probes[0]) for _ in range(3)),
                "adapter": statistics.median(probe_once(llm, probes[0], lora) for _ in range(3)),
            }
            merged_gen = timed_sampling(engine.llm, prompts, sizes.new_tokens)
            adapter_gen = timed_sampling(llm, prompts, sizes.new_tokens, lora)
            state = cpu_state()
        finally:
            shutdown = getattr(llm.llm_engine, "shutdown", None)  # as StudentEngine.close
            if callable(shutdown):
                shutdown()
            del llm
    del model, peft_model

    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    return {
        "model": str(student_dir),
        "params": count_params(student_dir),
        "dtype": settings.dtype,
        "rank": sizes.rank,
        "batch": len(prompts),
        "new_tokens": sizes.new_tokens,
        "merged": {
            "start_s": merged_start_s,
            "pushes": merged_rows,
            "median_push_s": med(merged_rows, "push_s"),
            "median_served_s": med(merged_rows, "served_s"),
            "steady_probe_s": steady["merged"],
            "sampling": merged_gen,
        },
        "adapter": {
            "start_s": adapter_start_s,
            "pushes": adapter_rows,
            "median_push_s": med(adapter_rows, "push_s"),
            "median_served_s": med(adapter_rows, "served_s"),
            "steady_probe_s": steady["adapter"],
            "sampling": adapter_gen,
        },
        "ratio_push_adapter_over_merged": med(adapter_rows, "push_s") / med(merged_rows, "push_s"),
        "ratio_served_adapter_over_merged": (
            med(adapter_rows, "served_s") / med(merged_rows, "served_s")
        ),
        "ratio_tokens_per_s_adapter_over_merged": (
            adapter_gen["tokens_per_s"] / merged_gen["tokens_per_s"]
        ),
        "agreement": {
            "greedy_tokens": GREEDY_TOKENS,
            "same_greedy_ids_adapter_merged": [a[0] for a in adapter_out]
            == [m[0] for m in merged_out],
            "max_abs_logp_adapter_vs_merged": logp_diff(adapter_out, merged_out),
            "max_abs_logp_merged_vs_transformers": logp_diff(merged_out, hf_out),
            "max_abs_logp_adapter_vs_transformers": logp_diff(adapter_out, hf_out),
            "logp_change_from_base_merged": logp_diff(merged_out, base),
            "logp_change_from_base_adapter": logp_diff(adapter_out, base),
            "pushes_live": min(logp_diff(merged_out, base), logp_diff(adapter_out, base))
            > LOGP_CHANGED,
        },
        **state,
    }


def measure(report: dict, sizes: Sizes, args) -> None:
    toy = toy_pair(args.quick)
    prompts = arithmetic_prompts(toy.student_dir, sizes.batch)
    probes = prompts[: sizes.probes]
    report["toy"] = measure_student(
        toy.student_dir, toy_engine_settings(toy.student_dir), sizes, prompts, probes
    )
    pair, why = smollm_pair(getattr(args, "skip_smollm", False))
    if pair is None:
        report.setdefault("skipped", {})["smollm2"] = why
        return
    prompts = arithmetic_prompts(pair.student_dir, sizes.batch)
    report["smollm2"] = measure_student(
        pair.student_dir,
        smollm_engine_settings(pair.student_dir, kv_cache_mb=512),
        sizes,
        prompts,
        prompts[: sizes.probes],
    )


def table(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    for key in ("toy", "smollm2"):
        fig = report.get(key)
        if not fig:
            continue
        m, a, agree = fig["merged"], fig["adapter"], fig["agreement"]
        rows += [
            (
                f"{key}: push (merged / adapter)",
                f"{m['median_push_s']:.3f} / {a['median_push_s']:.3f} s",
                f"ratio {fig['ratio_push_adapter_over_merged']:.2f}",
            ),
            (
                f"{key}: push + first probe",
                f"{m['median_served_s']:.3f} / {a['median_served_s']:.3f} s",
                f"ratio {fig['ratio_served_adapter_over_merged']:.2f}",
            ),
            (
                f"{key}: sampling tokens/s",
                f"{m['sampling']['tokens_per_s']:.0f} / {a['sampling']['tokens_per_s']:.0f}",
                f"ratio {fig['ratio_tokens_per_s_adapter_over_merged']:.2f}",
            ),
            (
                f"{key}: engine start",
                f"{m['start_s']:.1f} / {a['start_s']:.1f} s",
                "",
            ),
            (
                f"{key}: bytes per push",
                f"{m['pushes'][0]['bytes'] / 2**20:.1f} / {a['pushes'][0]['bytes'] / 2**20:.2f} MiB",
                "",
            ),
            (
                f"{key}: max |dlogp| adapter-merged",
                f"{agree['max_abs_logp_adapter_vs_merged']:.2e}",
                f"vs transformers {agree['max_abs_logp_merged_vs_transformers']:.1e} / "
                f"{agree['max_abs_logp_adapter_vs_transformers']:.1e}; live "
                f"{agree['pushes_live']}",
            ),
        ]
    return rows


def main(argv: list[str] | None = None) -> None:
    run(
        NAME,
        __doc__,
        measure,
        table,
        (Sizes(), QUICK),
        "tiny student, 2 pushes, small batch: a smoke test of both paths",
        smollm=True,
        argv=argv,
    )


if __name__ == "__main__":
    main()
