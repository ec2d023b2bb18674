"""Toy models: the tokenizer, the fast tiny builder, caching, and (slow) the teacher/student gap
measured through vLLM on the held-out set."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models import toy
from models.toy import BUILD_MARKER, build_tiny_model, build_tokenizer
from rollout import tasks


def test_char_tokenizer_round_trip():
    tok = build_tokenizer()
    p = tasks.Arithmetic(947, 285, "+")
    text = p.prompt + p.completion()
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_token_id, *ids, tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.encode("?", add_special_tokens=False) == [tok.unk_token_id]
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4


def _token_stats(folder, n: int = 100) -> tuple[float, float]:
    """Teacher-forced mean NLL and next-token accuracy on gold completions of held-out problems."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.toy import _batch

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids, mask, labels = _batch(tasks.eval_problems()[:n], tok)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logp = torch.log_softmax(logits.float(), -1)
    nll = -logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep].mean().item()
    acc = (logits.argmax(-1) == target)[keep].float().mean().item()
    return nll, acc


def test_tiny_builder_gives_a_loadable_better_than_chance_model(tmp_path, monkeypatch):
    folder = build_tiny_model(tmp_path / "tiny", steps=30, progress=False)
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        BUILD_MARKER,
    ]:
        assert (folder / name).is_file(), name
    tok = build_tokenizer()
    gen_cfg = json.loads((folder / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == tok.eos_token_id
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    nll, acc = _token_stats(folder)
    chance_nll = math.log(len(tok))
    # Chance is 1/|V| = 0.05 per token; 30 steps learn the fixed layout (+ = ; and column order).
    assert nll < 0.6 * chance_nll, (nll, chance_nll)
    assert acc > 0.3, acc

    # Cached: the same spec returns without training or touching the folder. Training is
    # made to fail, so a rebuild cannot pass unnoticed however fast it would be.
    stamp = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached build trained again")

    monkeypatch.setattr(toy, "train_sft", no_training)
    assert build_tiny_model(tmp_path / "tiny", steps=30) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamp
    # ... and the guard is live: a changed spec does reach training.
    with pytest.raises(AssertionError, match="trained again"):
        build_tiny_model(tmp_path / "tiny", steps=31)


def test_tiny_builder_is_deterministic_and_spec_sensitive(tmp_path):
    a = build_tiny_model(tmp_path / "a", steps=3)
    b = build_tiny_model(tmp_path / "b", steps=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    c = build_tiny_model(tmp_path / "a", steps=4)  # a different spec rebuilds in place
    marker = json.loads((c / BUILD_MARKER).read_text())
    assert marker["spec"]["train"]["max_steps"] == 4
    assert (c / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_toy_teacher_solves_heldout_and_student_is_clearly_weaker(toy_pair):
    """Greedy accuracy on the fixed 200-problem held-out set, measured through vLLM."""
    from rollout.sources import make_source
    from services.eval_command import evaluate_model_dir

    problems = make_source("arithmetic").eval_set()
    assert len(problems) == 200
    teacher = evaluate_model_dir(toy_pair.teacher_dir, problems, k=0, max_tokens=48)
    student = evaluate_model_dir(toy_pair.student_dir, problems, k=0, max_tokens=48)
    teacher, student = teacher["full_report"]["greedy"], student["full_report"]["greedy"]
    assert teacher["accuracy"] >= 0.9, teacher
    assert 0.05 <= student["accuracy"] <= 0.4, student
    # The gap is far outside both intervals: room for distillation to show.
    assert student["ci95"][1] < teacher["ci95"][0]

    params = {
        name: json.loads((folder / BUILD_MARKER).read_text())["report"]["params"]
        for name, folder in [("teacher", toy_pair.teacher_dir), ("student", toy_pair.student_dir)]
    }
    assert params["student"] < params["teacher"]


def test_toy_models_cached_says_whether_a_build_would_only_read_the_cache(tmp_path):
    """What the test session's background pre-build (tests/conftest.py) asks before it starts."""
    from models.toy import ModelSpec, ToySpec, TrainSpec, build_toy_models, toy_models_cached

    tiny = ModelSpec(hidden=16, layers=1, heads=1, ffn=32)
    spec = ToySpec(
        teacher=tiny,
        teacher_train=TrainSpec(max_steps=2, batch=4, lr=1e-3, warmup=1, eval_every=0),
        student=tiny,
        student_train=TrainSpec(max_steps=1, batch=4, lr=1e-3, warmup=1, eval_every=0),
    )
    assert not toy_models_cached(tmp_path, spec=spec)
    pair = build_toy_models(tmp_path, spec=spec, progress=False)
    assert toy_models_cached(tmp_path, spec=spec)
    assert not toy_models_cached(tmp_path, spec=spec, seed=1)  # another seed is another build
    (pair.student_dir / BUILD_MARKER).unlink()  # half a pair is not a cached pair
    assert not toy_models_cached(tmp_path, spec=spec)
