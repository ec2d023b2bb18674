"""Prompt-only evaluation (a chat dataset without answers): the student's greedy agreement with
the teacher's greedy answer and the per-token reverse KL of its own samples to the teacher
(rollout/accuracy.py), the held-out prompts it runs on, and one short in-process run."""

from __future__ import annotations

import json
import math

import pytest

from rollout import tasks
from rollout.accuracy import mean_interval, prompt_only_summary, wilson_interval
from services.eval_command import flatten_eval, held_out_prompts, prompt_only_lines


def test_the_figures_from_fixed_log_probs_and_texts():
    # prompt 0: two samples, 3 tokens: (−1+2) + (−1+3) + (−2+2) = 3 over 3 tokens → 1.0
    # prompt 1: one sample, 2 tokens: (−0.5+0.25) + (−1+1) = −0.25 over 2 tokens → −0.125
    # prompt 2: no samples with tokens (counts for agreement only)
    logps = [
        [([-1.0, -1.0], [-2.0, -3.0]), ([-2.0], [-2.0])],
        [([-0.5, -1.0], [-0.25, -1.0])],
        [],
    ]
    out = prompt_only_summary(["12", "7", ""], ["12", "8", ""], logps)
    assert out["greedy_agreement"] == {
        "agreement": 2 / 3,
        "ci95": list(wilson_interval(2, 3)),
        "n_agree": 2,
    }
    kl = out["reverse_kl"]
    # The mean over prompts of each prompt's per-token mean (not the mean over all 5 tokens,
    # 2.75 / 5 = 0.55): the interval is over prompts, so is the estimate.
    assert kl["estimate"] == pytest.approx((1.0 - 0.125) / 2, abs=1e-15)
    assert kl["n_prompts"] == 2 and kl["tokens"] == 5
    half = (
        1.959963984540054 * math.sqrt(((1.0 - 0.4375) ** 2 + (-0.125 - 0.4375) ** 2) / 1) / 2**0.5
    )
    assert kl["ci95"] == pytest.approx([0.4375 - half, 0.4375 + half])
    assert kl["ci95"][0] < 0  # an estimate, not clipped to [0, 1] like a proportion
    # Exact text match: a trailing space is a different answer.
    assert prompt_only_summary(["12 "], ["12"], [[]])["greedy_agreement"]["agreement"] == 0.0
    assert "reverse_kl" not in prompt_only_summary(["1"], ["1"], [[]])  # eval.samples = 0
    with pytest.raises(ValueError, match="2 student but 1 teacher"):
        prompt_only_summary(["1"], ["1"], [[([-1.0, -1.0], [-1.0])]])


def test_mean_interval_bounds():
    # mean 29/30, sd √(1/300), half-width 1.96 · sd / √3 = 0.06533: clipped at 1 by default
    half = 1.959963984540054 * math.sqrt(1 / 300) / math.sqrt(3)
    assert mean_interval([0.9, 1.0, 1.0]) == (pytest.approx(29 / 30 - half), 1.0)
    lo, hi = mean_interval([0.9, 1.0, 1.0], bounds=(-math.inf, math.inf))
    assert (lo, hi) == (pytest.approx(29 / 30 - half), pytest.approx(29 / 30 + half))
    assert mean_interval([3.0], bounds=(-math.inf, math.inf)) == (-math.inf, math.inf)


def _report(agreement_ci=(0.1, 0.9), kl=0.25):
    return {
        "n_prompts": 4,
        "k": 2,
        "greedy_agreement": {"agreement": 0.5, "ci95": list(agreement_ci), "n_agree": 2},
        "reverse_kl": {"estimate": kl, "ci95": [kl - 0.1, kl + 0.1], "n_prompts": 4, "tokens": 30},
        "greedy": {"truncated_fraction": 0.25},
        "examples": [],
    }


def test_the_flat_keys_and_the_closing_lines():
    flat = flatten_eval(_report())
    assert flat == {
        "n_problems": 0,
        "n_prompts": 4,
        "k": 2,
        "greedy_agreement": 0.5,
        "greedy_agreement_ci": [0.1, 0.9],
        "greedy_truncated_frac": 0.25,
        "sampled_reverse_kl": 0.25,
        "sampled_reverse_kl_ci": [0.15, 0.35],
        "sampled_tokens": 30,
        "examples": [],
    }
    lines = prompt_only_lines(flat, flatten_eval(_report((0.2, 1.0), kl=0.125)))
    assert lines[1].endswith("0.500 [95% CI 0.100–0.900] → 0.500 [95% CI 0.200–1.000]")
    assert lines[2].endswith("0.2500 [95% CI 0.1500–0.3500] → 0.1250 [95% CI 0.0250–0.2250]")
    assert prompt_only_lines({"n_problems": 3, "greedy_acc": 0.5}, None) == []


def _prompt_only_rows(n: int, seed: int = 5) -> list[dict]:
    gen = tasks.ArithmeticGenerator(seed=seed)
    return [{"prompt": gen.next().prompt, "id": f"row{i}"} for i in range(n)]


def test_held_out_prompts_of_a_prompt_only_dataset(tmp_path, toy_pair):
    """No held-out answers: the driver evaluates on ``eval_prompts`` through the run's token
    limit; a source with answers (or without ``eval_prompts``) keeps its ``eval_set``."""
    from transformers import AutoTokenizer

    from rollout.prompting import encode_prompt
    from rollout.sources import TokenLimitedSource, make_source

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _prompt_only_rows(60)))
    source = make_source("chat", path=path)
    assert source.eval_set() == [] and len(source.eval_prompts()) == 6
    assert held_out_prompts(source) == source.eval_prompts()
    tok = AutoTokenizer.from_pretrained(str(toy_pair.student_dir))
    lengths = sorted(len(encode_prompt(tok, p.prompt)) for p in source.eval_prompts())
    limited = TokenLimitedSource(
        source,
        lambda text: encode_prompt(tok, text),
        max_prompt_tokens=64,
        max_eval_tokens=lengths[2],
    )
    kept = held_out_prompts(limited)
    assert len(kept) == sum(n <= lengths[2] for n in lengths) < 6
    assert held_out_prompts(make_source("arithmetic")) == []


@pytest.mark.slow
def test_in_process_run_on_prompt_only_chats(ray_local, toy_pair, tmp_path, capsys):
    """Two steps on a chat dataset without answers: before/after carry the agreement and the
    reverse KL with intervals (metrics rows, summary, the console's closing lines)."""
    from run_helpers import rows, small_config

    from services.driver import train

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _prompt_only_rows(48)))
    cfg = small_config(
        toy_pair,
        tmp_path,
        "prompt-only",
        2,
        **{
            "rollout.in_process": "true",
            "task.source": "chat",
            "task.path": f'"{path}"',
            "eval.samples": 2,
        },
    )
    summary = train(cfg, progress=False)
    for result in (summary.eval_before, summary.eval_after):
        assert result["n_problems"] == 0 and result["n_prompts"] == 4 and result["k"] == 2
        a, (lo, hi) = result["greedy_agreement"], result["greedy_agreement_ci"]
        assert 0.0 <= lo <= a <= hi <= 1.0
        assert (lo, hi) == pytest.approx(wilson_interval(round(a * 4), 4))
        kl, (kl_lo, kl_hi) = result["sampled_reverse_kl"], result["sampled_reverse_kl_ci"]
        assert math.isfinite(kl) and kl_lo <= kl <= kl_hi
        assert kl > -0.05  # a Monte-Carlo estimate of a KL: near or above 0
        assert result["sampled_tokens"] > 0
    evals = {r["step"]: r for r in rows(tmp_path / "prompt-only") if "eval/n_prompts" in r}
    assert sorted(evals) == [0, 2]
    assert evals[0]["eval/greedy_agreement"] == summary.eval_before["greedy_agreement"]
    assert evals[2]["eval/sampled_reverse_kl"] == summary.eval_after["sampled_reverse_kl"]
    assert "eval/greedy_acc" not in evals[0]
    closing = capsys.readouterr()
    text = closing.out + closing.err
    assert "held-out prompts without answers (4)" in text and "95% CI" in text


def test_full_vocabulary_scoring_refuses_prompt_only_evaluation_before_engines_start():
    """A hidden-state scorer (distill.teacher_topk = "full") cannot generate the teacher's
    greedy answers: a prompt-only held-out set is a ConfigError naming the key and the way
    out, at start — not a failure at the first evaluation."""
    from rollout.sources import Problem
    from services.config import ConfigError, load_config
    from services.parts import check_evaluation

    prompts = [Problem(f"p{i}", f"say {i}", "", "chat:x", "chat") for i in range(3)]
    answered = [Problem("a", "1+1", "2", "arithmetic", "arithmetic")]
    full = load_config(None, ['distill.teacher_topk="full"'])
    with pytest.raises(ConfigError, match=r"distill.teacher_topk: 'full' .* to an integer"):
        check_evaluation(full, prompts)
    check_evaluation(full, answered)  # a verifier needs no teacher answers
    check_evaluation(load_config(None, ["distill.teacher_topk=8"]), prompts)
