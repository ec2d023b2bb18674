"""models/warm_start.py's pipeline on the tiny model: the teacher tune (SFT on gold answers) and
the student warm start (SFT on the teacher's greedy completions, sampled through vLLM), with
the smallest settings, on an arithmetic task written as a JSONL file.

Checked against references computed here: the completion loss of the trained examples before
and after (teacher-forced, with plain transformers), the frozen layers bit-for-bit, the held-out
prompts never trained on, the early stop at the first dev check, and the cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import warm_start
from models.common import BUILD_MARKER
from models.warm_start import SftSpec, TuneSpec, build_tuned
from rollout import tasks


def _sft(**changes) -> SftSpec:
    base = dict(steps=40, batch=16, lr=3e-3, warmup=2, bf16=False, threads=1, eval_every=20)
    return SftSpec(**(base | changes))


GOLD = TuneSpec(data="gold", n_prompts=64, n_dev=32, max_tokens=8, sft=_sft(train_from_layer=1))


@pytest.fixture(scope="module")
def task_file(tmp_path_factory) -> Path:
    """300 sums as JSONL records (the jsonl source holds 30 of them out for evaluation)."""
    gen = tasks.ArithmeticGenerator(seed=5)
    records = []
    for i in range(300):
        p = gen.next()
        records.append({"id": f"q{i}", "prompt": p.prompt, "answer": p.answer})
    path = tmp_path_factory.mktemp("task") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def completion_loss(folder, examples) -> float:
    """Mean −log p of the completion tokens given prompt and earlier completion tokens, one
    example at a time (no padding, no shared code with the SFT's batched loss)."""
    model = _load(folder)
    total, count = 0.0, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: more threads only fight over 2 shared cores
    try:
        for e in examples:
            ids = torch.tensor([e["prompt_ids"] + e["completion_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            start = len(e["prompt_ids"]) - 1  # predicts the first completion token
            targets = ids[0, start + 1 :]
            total -= logp[start:].gather(-1, targets[:, None]).sum().item()
            count += len(targets)
    finally:
        torch.set_num_threads(threads)
    return total / count


def _capture_sft(monkeypatch) -> list:
    """Record what ``sft`` is given, then run it."""
    seen = []
    real = warm_start.sft

    def recording(model, examples, spec, **kwargs):
        seen.append((list(examples), spec))
        return real(model, examples, spec, **kwargs)

    monkeypatch.setattr(warm_start, "sft", recording)
    return seen


@pytest.fixture(scope="module")
def gold_tuned(tiny_model, task_file, tmp_path_factory):
    """The teacher stage: the tiny model after GOLD, with what its SFT trained on."""
    with pytest.MonkeyPatch.context() as mp:
        seen = _capture_sft(mp)
        folder = tmp_path_factory.mktemp("gold") / "teacher"
        info = build_tuned(folder, tiny_model, task_file, GOLD, log=lambda _: None)
    [(examples, spec)] = seen
    return folder, info, examples


def test_gold_tune_writes_a_loadable_model(gold_tuned, tiny_model):
    from transformers import AutoTokenizer

    folder, info, _ = gold_tuned
    marker = json.loads((folder / BUILD_MARKER).read_text())
    assert marker["spec_hash"] == info["spec_hash"]
    assert marker["spec"]["tune"]["sft"]["steps"] == GOLD.sft.steps
    model, base = _load(folder), _load(tiny_model)
    assert model.config.num_hidden_layers == base.config.num_hidden_layers
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.decode(tok("12+34=#46", add_special_tokens=False)["input_ids"]) == "12+34=#46"


def test_gold_tune_lowers_the_loss_on_what_it_trained(gold_tuned, tiny_model):
    folder, info, examples = gold_tuned
    report = info["report"]
    assert report["examples"] == len(examples) == GOLD.n_prompts
    assert report["steps"] == GOLD.sft.steps  # no early stop: dev accuracy never reaches 1.01
    before = completion_loss(tiny_model, examples)
    after = completion_loss(folder, examples)
    assert after < 0.6 * before, (before, after)
    # The dev check ran before and during training (every 20 steps), on accuracies in [0, 1].
    assert 0.0 <= report["dev_acc_before"] <= 1.0 and 0.0 <= report["dev_acc"] <= 1.0


def test_gold_tune_keeps_the_frozen_layers(gold_tuned, tiny_model):
    """train_from_layer = 1: the embeddings and layer 0 are bit-identical, the rest moved."""
    folder, _, _ = gold_tuned
    tuned = dict(_load(folder).named_parameters())
    base = dict(_load(tiny_model).named_parameters())
    assert tuned.keys() == base.keys()
    frozen = [n for n in base if n.startswith(("model.embed_tokens.", "model.layers.0."))]
    moved = [n for n in base if n.startswith(("model.layers.1.", "lm_head."))]
    assert frozen and moved
    for n in frozen:
        assert torch.equal(tuned[n], base[n]), n
    for n in moved:
        if n.endswith("norm.weight"):
            continue  # RMSNorm gains may barely move in 40 steps
        assert not torch.equal(tuned[n], base[n]), n


def test_gold_tune_never_trains_on_held_out_prompts(gold_tuned, task_file):
    from transformers import AutoTokenizer

    from rollout.sources import make_source

    folder, _, examples = gold_tuned
    tok = AutoTokenizer.from_pretrained(folder)
    trained = {tok.decode(e["prompt_ids"], skip_special_tokens=True) for e in examples}
    held_out = {p.prompt for p in make_source("jsonl", path=task_file, seed=0).eval_set()}
    assert len(trained) == GOLD.n_prompts and held_out
    assert not trained & held_out
    # The completions are the gold answers behind the marker, then EOS.
    e = examples[0]
    assert e["completion_ids"][-1] == tok.eos_token_id
    assert tok.decode(e["completion_ids"], skip_special_tokens=True).startswith("#")


def test_cached_build_does_not_train_again(gold_tuned, tiny_model, task_file, monkeypatch):
    folder, info, _ = gold_tuned
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached build trained again")

    monkeypatch.setattr(warm_start, "sft", no_training)
    assert build_tuned(folder, tiny_model, task_file, GOLD, log=lambda _: None) == info
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    # A changed spec does rebuild (and so reaches the trap).
    changed = TuneSpec(**{**GOLD.__dict__, "n_prompts": 48})
    with pytest.raises(AssertionError, match="trained again"):
        build_tuned(folder, tiny_model, task_file, changed, log=lambda _: None)


def test_stops_at_the_first_dev_check_that_reaches_the_target(tiny_model, task_file, tmp_path):
    spec = TuneSpec(
        data="gold",
        n_prompts=32,
        n_dev=16,
        max_tokens=8,
        sft=_sft(steps=40, eval_every=5, stop_at_dev_acc=0.0),
    )
    lines = []
    info = build_tuned(tmp_path / "early", tiny_model, task_file, spec, log=lines.append)
    assert info["report"]["steps"] == 5
    assert info["report"]["dev_acc"] is not None
    assert any(line.startswith("sft step 5/40") for line in lines), lines


def test_bad_specs_are_refused(tiny_model, task_file, tmp_path):
    with pytest.raises(ValueError, match="unknown SFT data 'silver'"):
        build_tuned(tmp_path / "x", tiny_model, task_file, TuneSpec("silver", 8, _sft()))
    with pytest.raises(ValueError, match="needs teacher_dir"):
        build_tuned(tmp_path / "x", tiny_model, task_file, TuneSpec("teacher", 8, _sft()))


@pytest.mark.slow
def test_student_warm_start_from_the_tuned_teacher(gold_tuned, tiny_model, task_file, tmp_path):
    """The student stage: the tuned tiny teacher's greedy completions (vLLM) become the SFT
    data of a fresh tiny student, whose loss on them falls."""
    teacher, _, _ = gold_tuned
    spec = TuneSpec(data="teacher", n_prompts=48, n_dev=16, max_tokens=8, sft=_sft(steps=30))
    with pytest.MonkeyPatch.context() as mp:
        seen = _capture_sft(mp)
        info = build_tuned(
            tmp_path / "student", tiny_model, task_file, spec, teacher_dir=teacher, log=print
        )
    [(examples, _)] = seen
    report = info["report"]
    assert 0.0 <= report["teacher_train_acc"] <= 1.0
    # Completions cut at max_tokens are dropped; the rest end with the teacher's EOS.
    assert 0 < report["examples"] == len(examples) <= spec.n_prompts
    eos = _load(teacher).generation_config.eos_token_id
    assert all(e["completion_ids"][-1] == eos for e in examples)
    assert len(json.loads((tmp_path / "student" / BUILD_MARKER).read_text())["spec_hash"]) == 16
    before = completion_loss(tiny_model, examples)
    after = completion_loss(tmp_path / "student", examples)
    assert after < 0.6 * before, (before, after)
