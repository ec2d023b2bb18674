"""Evaluation: confidence intervals, the accounting of greedy / avg@k / pass@k, and a real engine run."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from rollout.accuracy import evaluate, mean_interval, wilson_interval
from rollout.sources import Problem, make_source


def test_wilson_interval_known_values():
    # Reference values from the closed form (e.g. statsmodels proportion_confint(method="wilson")).
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(180, 200) == pytest.approx((0.8506, 0.9343), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"need 0 <= successes <= n, got 3 of 2"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError, match=r"need 0 <= successes <= n, got -1 of 2"):
        wilson_interval(-1, 2)


def test_mean_interval():
    lo, hi = mean_interval([0.0, 1.0] * 50)
    assert (lo, hi) == pytest.approx(
        (0.5 - 1.96 * 0.50252 / 10, 0.5 + 1.96 * 0.50252 / 10), abs=1e-3
    )
    assert mean_interval([1.0] * 10) == (1.0, 1.0)
    assert mean_interval([0.3]) == (0.0, 1.0)


@dataclass(frozen=True)
class _Gen:
    token_ids: tuple[int, ...]
    finish_reason: str = "stop"


class _ScriptedEngine:
    """Returns fixed completions: greedy answers from ``greedy``, samples from ``samples``."""

    def __init__(self, tokenizer, greedy: list[str], samples: list[list[str]]):
        self.tok, self.greedy, self.samples = tokenizer, greedy, samples
        self.calls = []

    def _gen(self, text):
        return _Gen(tuple(self.tok.encode(text, add_special_tokens=False)))

    def generate(self, prompt_ids, *, max_tokens, temperature, n, seed):
        self.calls.append((len(prompt_ids), temperature, n, seed))
        if temperature == 0.0:
            return [[self._gen(t)] for t in self.greedy]
        return [[self._gen(t) for t in row] for row in self.samples]


def test_evaluate_accounting_with_a_scripted_engine(tmp_path):
    from models.toy import build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    problems = make_source("arithmetic").eval_set()[:4]
    right = [f"#{p.answer}" for p in problems]
    greedy = [right[0], right[1], "#1", "7+5"]  # 2 of 4 correct
    samples = [
        [right[0]] * 4,
        [right[1], "#x", "#x", "#x"],
        ["#x"] * 4,
        ["", right[3], right[3], "#"],
    ]
    engine = _ScriptedEngine(tok, greedy, samples)

    report = evaluate(tmp_path, problems, engine=engine, k=4, seed=3)

    assert engine.calls == [(4, 0.0, 1, 3), (4, 1.0, 4, 3)]
    assert report["n_problems"] == 4
    assert report["greedy"]["accuracy"] == 0.5 and report["greedy"]["n_correct"] == 2
    assert report["greedy"]["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert report["avg_at_k"]["accuracy"] == pytest.approx((1 + 0.25 + 0 + 0.5) / 4)
    assert report["pass_at_k"] == 0.75
    assert report["examples"][0]["completion"] == right[0]
    json.dumps(report)  # JSON-serialisable


def test_evaluate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least one problem"):
        evaluate(tmp_path, [], engine=object())
    with pytest.raises(ValueError, match="k must be"):
        evaluate(
            tmp_path, [Problem("a", "1+1=", "2", "arithmetic", "arithmetic")], engine=object(), k=-1
        )


def _hf_greedy_completions(model_dir, problems, max_tokens: int) -> list[str]:
    """Greedy completions from transformers, one prompt at a time (no padding): a reference
    that shares nothing with the vLLM path but the prompt encoding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.prompting import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    texts = []
    with torch.no_grad():
        for p in problems:
            ids = torch.tensor([encode_prompt(tok, p.prompt)])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            texts.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return texts


@pytest.mark.slow
def test_evaluate_through_vllm_matches_a_transformers_reference(toy_pair):
    """The toy student (~0.3 held-out) through vLLM: its greedy accuracy is the one transformers'
    own greedy decoding of the same problems scores, computed here independently."""
    from rollout.engine import EngineSettings, StudentEngine
    from rollout.sources import score

    model_dir = toy_pair.student_dir
    problems = make_source("arithmetic").eval_set()[:40]
    engine = StudentEngine(
        EngineSettings(model_path=str(model_dir), dtype="float32", seed=0, kv_cache_mb=64)
    )
    try:
        first = evaluate(model_dir, problems, engine=engine, k=3, max_tokens=40)
        again = evaluate(model_dir, problems, engine=engine, k=0, max_tokens=40)
    finally:
        engine.close()
    json.dumps(first)
    assert first["n_problems"] == 40 and first["k"] == 3

    reference = _hf_greedy_completions(model_dir, problems, max_tokens=40)
    ref_correct = sum(score(p, t) >= 1.0 for p, t in zip(problems, reference, strict=True))
    assert 4 <= ref_correct <= 36, ref_correct  # a model neither hopeless nor perfect here
    # Two fp32 implementations may break a near-tie differently: allow one problem in 20.
    assert abs(first["greedy"]["n_correct"] - ref_correct) <= 2, (first["greedy"], ref_correct)
    assert first["greedy"]["accuracy"] == first["greedy"]["n_correct"] / 40
    assert first["greedy"]["ci95"] == pytest.approx(
        list(wilson_interval(first["greedy"]["n_correct"], 40))
    )
    shown = [e["completion"] for e in first["examples"]]
    assert sum(a == b for a, b in zip(shown, reference, strict=False)) >= len(shown) - 1
    assert [e["score"] for e in first["examples"]] == [
        score(p, e["completion"]) for p, e in zip(problems, first["examples"], strict=False)
    ]
    # Sampled metrics: pass@k counts a problem once any of its k samples is right.
    assert 0 < first["avg_at_k"]["accuracy"] <= first["pass_at_k"] <= 1
    assert 0 < first["greedy"]["mean_tokens"] <= 40
    # Greedy decoding is deterministic: same completions on a second pass.
    assert first["examples"] == again["examples"] and "avg_at_k" not in again
