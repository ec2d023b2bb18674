"""Teacher scoring benchmark: seconds per batch and payload bytes per response token of the
teacher's final hidden states (``TeacherHiddenEngine.hidden_states``, vLLM's pooling runner),
against today's top-8 log-prob lists (``TeacherEngine.score`` with ``teacher_topk = 8``), on the
toy pair (float32) and on the SmolLM2 pair (bf16).

Both engines score the same batch: arithmetic-task prompts encoded as the pipeline does, each
followed by a fixed-length response of seeded random token ids (scoring is a prefill: its cost
does not depend on which tokens they are). Both engines stay open together (closing one
in-process engine breaks the other); one warm-up call each on 8 samples is excluded, then the
two are timed alternately, ``repeats`` times each, and the medians are reported.

Payload: what a scorer would hand on per response token — the pickled ``TeacherScore`` list
(what crosses Ray today) and the pickled list of [R, H] tensors; the raw tensor bytes
(R × H × itemsize) and the float32 full-vocabulary row (V × 4, a reference) beside them.

Run from the repository root::

    .venv/bin/python bench/teacher_scoring.py                          # toy pair, then SmolLM2
    .venv/bin/python bench/teacher_scoring.py --quick --skip-smollm    # smoke test: tiny pair

Results: a table on stdout, ``<out>/teacher_scoring-<timestamp>.json`` and ``-latest.json``.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from common import (
    Pair,
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

NAME = "teacher_scoring"
TOPK = 8


@dataclass(frozen=True)
class Sizes:
    toy_batch: int = 128
    toy_tokens: int = 40
    smol_batch: int = 64
    smol_tokens: int = 64
    repeats: int = 3


QUICK = Sizes(toy_batch=32, toy_tokens=16, smol_batch=8, smol_tokens=16, repeats=1)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_responses(vocab: int, batch: int, tokens: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (batch, tokens), generator=g).tolist()


def score_pair(pair: Pair, settings, batch: int, new_tokens: int, repeats: int) -> dict:
    from rollout.engine import TeacherEngine, TeacherHiddenEngine

    prompts = arithmetic_prompts(pair.student_dir, batch)
    base = settings(pair.teacher_dir)
    rss0 = _rss_mib()
    with (
        open_engine(TeacherEngine, _with(base, teacher_topk=TOPK)) as (topk, topk_start_s),
        open_engine(TeacherHiddenEngine, base) as (hidden, hidden_start_s),
    ):
        rss_hidden = _rss_mib()
        responses = random_responses(topk.vocab_size, batch, new_tokens)
        topk.score(prompts[:8], responses[:8])
        hidden.hidden_states(prompts[:8], responses[:8])
        topk_s, hidden_s = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            scores = topk.score(prompts, responses)
            topk_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            states = hidden.hidden_states(prompts, responses)
            hidden_s.append(time.perf_counter() - t0)
        tokens = sum(map(len, responses))
        h = states[0]
        hidden_size, dtype = h.shape[-1], str(h.dtype).removeprefix("torch.")
        raw = sum(s.numel() * s.element_size() for s in states)
        topk_pickled = len(pickle.dumps(scores, protocol=5))
        hidden_pickled = len(pickle.dumps(states, protocol=5))
        agreement = logprob_agreement(pair.teacher_dir, topk.vocab_size, responses, scores, states)
    t_topk, t_hidden = statistics.median(topk_s), statistics.median(hidden_s)
    return {
        "teacher": str(pair.teacher_dir),
        "teacher_params": count_params(pair.teacher_dir),
        "engine_dtype": base.dtype,
        "hidden_dtype": dtype,
        "hidden_size": hidden_size,
        "vocab": topk.vocab_size,
        "sequences": batch,
        "scored_tokens": sum(map(len, prompts)) + tokens,
        "response_tokens": tokens,
        "topk": TOPK,
        "topk_score_s": t_topk,
        "hidden_score_s": t_hidden,
        "topk_runs_s": topk_s,
        "hidden_runs_s": hidden_s,
        "hidden_over_topk_time": t_hidden / t_topk,
        "bytes_per_token": {
            "topk_pickled": topk_pickled / tokens,
            "hidden_pickled": hidden_pickled / tokens,
            "hidden_raw": raw / tokens,
            "full_vocab_float32_raw": 4 * topk.vocab_size,
        },
        "hidden_over_topk_bytes": hidden_pickled / topk_pickled,
        "logprob_agreement": agreement,
        "engine_start_s": {"topk": topk_start_s, "hidden": hidden_start_s},
        "rss_mib": {"before": rss0, "both_engines_open": rss_hidden},
        **cpu_state(),
    }


def logprob_agreement(teacher_dir, vocab, responses, scores, states) -> dict:
    """max |log π_T from the hidden states − TeacherEngine.score's| on the first 8 samples,
    the teacher's output layer applied in float32 (the learner's computation)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    weight_VH = model.get_output_embeddings().weight.detach()[:vocab]
    sampled, top = 0.0, 0.0
    for r, score, h_RH in zip(responses[:8], scores[:8], states[:8], strict=True):
        logp_RV = (h_RH.float() @ weight_VH.T).log_softmax(-1)
        got = logp_RV.gather(-1, torch.tensor(r)[:, None])[:, 0]
        sampled = max(sampled, (got - torch.tensor(score.logp_teacher)).abs().max().item())
        got_top = logp_RV.gather(-1, torch.tensor(score.topk_ids))
        top = max(top, (got_top - torch.tensor(score.topk_logp)).abs().max().item())
    return {"max_abs_sampled": sampled, "max_abs_topk": top}


def _with(settings, **fields):
    from dataclasses import replace

    return replace(settings, **fields)


def measure(report: dict, sizes: Sizes, args: argparse.Namespace) -> None:
    toy = toy_pair(args.quick)
    report["teacher_scoring"] = {
        toy.name: score_pair(
            toy, toy_engine_settings, sizes.toy_batch, sizes.toy_tokens, sizes.repeats
        )
    }
    smol, skipped = smollm_pair(args.skip_smollm)
    if smol is None:
        report["skipped"] = {"smollm2": skipped}
        return
    report["teacher_scoring"]["smollm2"] = score_pair(
        smol, smollm_engine_settings, sizes.smol_batch, sizes.smol_tokens, sizes.repeats
    )


def table(report: dict) -> list[tuple[str, str, str]]:
    rows = []
    for name, s in report.get("teacher_scoring", {}).items():
        b = s["bytes_per_token"]
        rows.append(
            (
                f"{name}: hidden states {s['hidden_score_s']:.3f} s / top-{TOPK} lists "
                f"{s['topk_score_s']:.3f} s ({s['sequences']} x {s['response_tokens'] // s['sequences']})",
                f"{s['hidden_over_topk_time']:.2f}x time",
                "< 1x",
            )
        )
        rows.append(
            (
                f"{name}: bytes/token pickled hidden ({s['hidden_dtype']}, H={s['hidden_size']}) "
                f"{b['hidden_pickled']:.0f} / top-{TOPK} {b['topk_pickled']:.0f}",
                f"{s['hidden_over_topk_bytes']:.2f}x bytes",
                "— (report)",
            )
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    quick_help = "tiny models, small batches (smoke test)"
    run(NAME, __doc__, measure, table, (Sizes(), QUICK), quick_help, smollm=True, argv=argv)


if __name__ == "__main__":
    main()
