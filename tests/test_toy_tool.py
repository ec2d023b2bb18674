"""The calculator tool pair (models/toy_tool.py): its problems, its tokenizer, a deterministic
cached build, and what the built pair does with the real ``calculator`` environment in the loop
— the teacher solves the held-out set with the tool, the student rarely calls it."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from models import toy_tool as tt
from models.toy import ModelSpec, TrainSpec, build_tokenizer
from rollout import prompting, tasks
from rollout.sources import JsonlSource

# A build of a few steps: seconds, enough to compare bytes and hit the cache.
TINY = tt.ToolPairSpec(
    teacher=ModelSpec(hidden=32, layers=1, heads=1, ffn=64),
    teacher_train=TrainSpec(max_steps=3, batch=8, lr=3e-3, warmup=1, eval_every=0),
    student=ModelSpec(hidden=32, layers=1, heads=1, ffn=64),
    student_train=TrainSpec(max_steps=3, batch=8, lr=3e-3, warmup=1, eval_every=0),
)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One torch thread: these tests run beside the background model builds (conftest), where
    two threads on a shared core ran 2.5-3x slower (models/toy.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_held_out_set_is_fixed_and_disjoint_through_the_jsonl_source(tmp_path):
    train, heldout = tt.split()
    assert len(heldout) == tt.EVAL_SIZE
    assert len(train) + len(heldout) == (tt.HIGH - tt.LOW + 1) ** 2
    assert not {p.id for p in train} & {p.id for p in heldout}
    assert tt.split() == (train, heldout)
    assert set(tt.dev_problems(train)) <= set(train)
    tt._write_data(tmp_path)
    source = JsonlSource(tmp_path / "train.jsonl", eval_path=tmp_path / "heldout.jsonl")
    assert [(p.id, p.prompt, p.answer) for p in source.eval_set()] == [
        (p.problem().id, p.prompt, p.answer) for p in heldout
    ]
    assert all(p.prompt in {q.prompt for q in train} for p in source.next_batch(64))


def test_tokenizer_round_trips_trajectories_and_tool_errors():
    tok = build_tokenizer(tt.VOCAB_CHARS)
    p = tt.Product(37, 58)
    trajectory = p.prompt + "".join(text for text, _ in p.tool_segments())
    assert trajectory == "37*58=<calc>37*58</calc>[2146]#2146"
    error = "[error: not an arithmetic expression: '37*(']"  # a calculator error, as appended
    for text in (trajectory, error):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    # Labels: the student's own tokens only — never the prompt, never the tool's answer.
    ids, labels = tt._encode_example(tok, p, p.tool_segments())
    own = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert own == "<calc>37*58</calc>#2146" + tok.eos_token


def test_build_is_deterministic_and_cached(tmp_path):
    a = tt.build_toy_tool_models(tmp_path / "a", spec=TINY)
    b = tt.build_toy_tool_models(tmp_path / "b", spec=TINY)
    for role in ("teacher", "student"):
        wa = getattr(a, f"{role}_dir") / "model.safetensors"
        wb = getattr(b, f"{role}_dir") / "model.safetensors"
        assert _sha(wa) == _sha(wb), role
    assert a.train_path.read_bytes() == b.train_path.read_bytes()
    assert tt.toy_tool_cached(tmp_path / "a", spec=TINY)
    # Same spec: read from the cache, nothing rewritten.
    before = (a.teacher_dir / "model.safetensors").stat()
    again = tt.build_toy_tool_models(tmp_path / "a", spec=TINY)
    after = (a.teacher_dir / "model.safetensors").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert again.report == a.report
    # Another spec is another build.
    longer = dataclasses.replace(
        TINY, teacher_train=dataclasses.replace(TINY.teacher_train, max_steps=4)
    )
    assert not tt.toy_tool_cached(tmp_path / "a", spec=longer)
    tt.build_toy_tool_models(tmp_path / "a", spec=longer)
    assert _sha(a.teacher_dir / "model.safetensors") != _sha(b.teacher_dir / "model.safetensors")
    assert _sha(a.student_dir / "model.safetensors") == _sha(b.student_dir / "model.safetensors")


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_teacher_solves_the_held_out_set_with_the_calculator(toy_tool_pair):
    model, tok = _load(toy_tool_pair.teacher_dir)
    _, heldout = tt.split()
    episodes = tt.greedy_episodes(model, tok, heldout)
    summary = tt.episode_summary(episodes)
    assert summary["accuracy"] >= 0.9, summary
    assert summary["tool_call_rate"] >= 0.9, summary
    assert summary == toy_tool_pair.report["teacher"]["heldout_hf"]  # the build's own figures
    p, e = heldout[0], episodes[0]
    assert e.text == f"<calc>{p.a}*{p.b}</calc>[{p.answer}]#{p.answer}", e


def test_student_rarely_calls_the_tool_and_is_mostly_wrong(toy_tool_pair):
    from models.checks import check_pair

    check_pair(toy_tool_pair.student_dir, toy_tool_pair.teacher_dir)  # one tokenizer
    model, tok = _load(toy_tool_pair.student_dir)
    _, heldout = tt.split()
    summary = tt.episode_summary(tt.greedy_episodes(model, tok, heldout))
    assert summary["tool_call_rate"] <= 0.1, summary
    assert summary["accuracy"] <= 0.2, summary
    assert summary == toy_tool_pair.report["student"]["heldout_hf"]
    # Sampling, it does start a call now and then: OPD+ has tool episodes to learn from.
    ids_BT = torch.tensor([prompting.encode_prompt(tok, p.prompt) for p in heldout])
    with torch.no_grad():
        probs_BV = model(input_ids=ids_BT).logits[:, -1].softmax(-1)
    p_call = probs_BV[:, tok.convert_tokens_to_ids(tt.CALL_OPEN[0])].mean().item()
    p_direct = probs_BV[:, tok.convert_tokens_to_ids(tasks.ANSWER_MARKER)].mean().item()
    assert 0.01 <= p_call <= 0.2 < p_direct, (p_call, p_direct)


def test_cli_toy_models_tool_names_the_cached_pair(toy_tool_pair, capsys):
    import json

    from services.cli import main

    assert main(["toy-models", "--tool"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "teacher": str(toy_tool_pair.teacher_dir),
        "student": str(toy_tool_pair.student_dir),
        "train": str(toy_tool_pair.train_path),
        "heldout": str(toy_tool_pair.heldout_path),
    }
