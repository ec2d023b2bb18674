"""Output layers padded beyond the tokenizer (Qwen's 151936 / 152064 rows for 151665 ids) are
sliced to the tokenizer's length on every path: the learner's log-probs (sampled and top-K,
chunked and full-logits), the teacher's scores and top-K, sampling, evaluation and weight sync;
tokenizers that really differ are refused naming the first differing id (docs/math.md,
"Padding rows"). Padded copies are built here, in tmp_path, from the cached toy pair (never
changed) with large random padding rows, so that any path that forgets the slice shows it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from learner_settings import loss_settings
from transformers import LlamaConfig, LlamaForCausalLM

from learner.batch import collate
from learner.step import compute_loss, global_normaliser
from models.checks import ModelPairError, check_pair, tokenizer_length
from rollout.alignment import response_positions

VOCAB, ROWS, K = 32, 64, 4


def pad_rows(model, rows: int, *, seed: int = 0):
    """`model` (in place) with `rows` output/embedding rows: the new ones random and large (10×
    the real rows' scale), so their logits dominate any softmax that does not leave them out."""
    real = model.config.vocab_size
    model.resize_token_embeddings(rows, mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in {model.get_output_embeddings().weight, model.get_input_embeddings().weight}:
            scale = 10 * weight[:real].std()
            weight[real:] = scale * torch.randn(rows - real, weight.shape[1], generator=g)
    assert model.config.vocab_size == rows
    return model


def padded_copy(src: Path, dst: Path, rows: int, *, seed: int = 0) -> Path:
    """A copy of the HF folder `src` whose model has `rows` rows (tokenizer unchanged)."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("eval-*.json", "*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    pad_rows(model, rows, seed=seed).save_pretrained(dst)
    assert json.loads((dst / "config.json").read_text())["vocab_size"] == rows
    return dst


# ---------------------------------------------------------------------- the learner (pure torch)


def tiny_pair(seed=0):
    """(unpadded, padded) tiny Llamas with the same real rows; the padded one has ROWS rows."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    plain = LlamaForCausalLM(config)
    padded = LlamaForCausalLM(config)
    padded.load_state_dict(plain.state_dict())
    return plain, pad_rows(padded, ROWS, seed=seed + 1)


def topk_batch(n=3, seed=0):
    from rollout.records import Rollout, ScoredRollout

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        P, R = 2 + i % 2, 3 + i
        ids = torch.randint(0, VOCAB, (P + R,), generator=g).tolist()
        teacher_RV = (2.0 * torch.randn(R, VOCAB, generator=g)).log_softmax(-1)
        top = teacher_RV.topk(K, -1)
        rollout = Rollout(
            sample_id=f"p{i}/0",
            problem_id=f"p{i}",
            answer="",
            prompt_ids=tuple(ids[:P]),
            response_ids=tuple(ids[P:]),
            logp_sampler=tuple((-2.0 + 0.3 * torch.randn(R, generator=g)).tolist()),
            policy_version=0,
            finish_reason="stop",
        )
        out.append(
            ScoredRollout(
                rollout=rollout,
                logp_teacher=tuple(
                    teacher_RV.gather(-1, torch.tensor(ids[P:])[:, None])[:, 0].tolist()
                ),
                teacher_topk_ids=tuple(tuple(x) for x in top.indices.tolist()),
                teacher_topk_logp=tuple(tuple(x) for x in top.values.tolist()),
            )
        )
    return out


@pytest.mark.parametrize("topk", [False, True])
@pytest.mark.parametrize("chunk", [0, 3])
def test_the_learner_softmax_leaves_the_padding_rows_out(topk, chunk):
    """A padded student with vocab_size = the tokenizer's length has the unpadded one's loss,
    statistics and gradients (the padding rows get none), on the chunked and the full-logits
    path, sampled and top-K; without vocab_size the padding rows change the loss."""
    from rollout.records import ScoredRollout

    plain, padded = tiny_pair()
    scored = topk_batch()
    if not topk:
        scored = [ScoredRollout(rollout=s.rollout, logp_teacher=s.logp_teacher) for s in scored]
    batch = collate(scored, pad_id=0)
    n = global_normaliser(batch, "token_mean")
    settings = loss_settings(divergence="js", logprob_chunk=chunk, temperature=0.7)

    def run(model, **kw):
        loss, stats = compute_loss(model, batch, settings=settings, normaliser=n, **kw)
        return loss, stats, torch.autograd.grad(loss, list(model.parameters()))

    ref_loss, ref_stats, ref_grads = run(plain)
    loss, stats, grads = run(padded, vocab_size=VOCAB)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
    assert stats.divergence == pytest.approx(ref_stats.divergence, rel=1e-6)
    for (name, _), g, rg in zip(padded.named_parameters(), grads, ref_grads, strict=True):
        if g.shape != rg.shape:  # the output layer: real rows as before, padding rows zero
            assert name == "lm_head.weight" or "embed_tokens" in name, name
            assert (g[VOCAB:] == 0).all()
            g = g[:VOCAB]
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-7)

    every_row, _, _ = run(padded)  # the rule broken: the softmax over the padding rows too
    assert abs(every_row.item() - ref_loss.item()) > 1e-3


def test_the_learner_refuses_ids_of_padding_rows():
    from learner.logprobs import sampled_logprobs

    _, padded = tiny_pair()
    ids_BT = torch.tensor([[1, 2, VOCAB + 3]])
    positions_BT = torch.tensor([[0, 1, 1]])
    with pytest.raises(ValueError, match=f"outside the vocabulary of {VOCAB}"):
        sampled_logprobs(padded, ids_BT, torch.ones_like(ids_BT), positions_BT, vocab_size=VOCAB)
    extra_BTK = torch.full((1, 3, 2), VOCAB + 1)
    with pytest.raises(ValueError, match="extra_ids_BTK span"):
        sampled_logprobs(
            padded,
            ids_BT.clamp(max=VOCAB - 1),
            torch.ones_like(ids_BT),
            positions_BT,
            extra_ids_BTK=extra_BTK,
            vocab_size=VOCAB,
        )


# ---------------------------------------------------------------------- the pair check


def _edit_tokenizer(folder: Path, edit) -> None:
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_the_pair_check_allows_padding_and_names_the_first_differing_token(toy_pair, tmp_path):
    """Output layers of different sizes pass (the tokenizer's length is returned); a tokenizer
    with two tokens swapped, or one more token, is refused at the first differing id, with the
    text on each side; a config whose vocab_size is below its tokenizer is refused."""
    student, teacher = Path(toy_pair.student_dir), Path(toy_pair.teacher_dir)
    n = tokenizer_length(student)
    assert n == json.loads((student / "config.json").read_text())["vocab_size"]

    def copy(name: str) -> Path:
        dst = tmp_path / name  # the config and tokenizer only: the check reads no weights
        shutil.copytree(teacher, dst, ignore=shutil.ignore_patterns("eval-*.json"))
        return dst

    padded = copy("padded")
    cfg = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**cfg, "vocab_size": 128}))
    assert check_pair(student, padded) == n

    swapped = copy("swapped")
    vocab = json.loads((swapped / "tokenizer.json").read_text())["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = sorted(by_id)[-2:]  # the last two ids of the model vocabulary

    def swap(data):
        v = data["model"]["vocab"]
        v[by_id[a]], v[by_id[b]] = b, a

    _edit_tokenizer(swapped, swap)
    with pytest.raises(ModelPairError) as err:
        check_pair(student, swapped)
    assert f"differ at token id {a}: student {by_id[a]!r}, teacher {by_id[b]!r}" in str(err.value)

    longer = copy("longer")
    _edit_tokenizer(
        longer,
        lambda d: d["added_tokens"].append(
            {**d["added_tokens"][-1], "id": n, "content": "<extra>"}
        ),
    )
    with pytest.raises(ModelPairError, match=rf"token id {n}: student no token \(its tokenizer "):
        check_pair(student, longer)
    with pytest.raises(ModelPairError, match="teacher no token"):
        check_pair(longer, student)

    short = copy("short")
    (short / "config.json").write_text(json.dumps({**cfg, "vocab_size": n - 1}))
    with pytest.raises(ModelPairError, match=f"vocab_size {n - 1} is smaller than"):
        check_pair(student, short)


# ---------------------------------------------------------------------- real vLLM, real runs


@pytest.mark.slow
def test_a_padded_teacher_scores_like_the_unpadded_one(toy_pair, tmp_path):
    """The real vLLM teacher on a copy padded to 128 rows: the log-probs of the given tokens
    and the top-K equal the unpadded teacher's (transformers, full softmax over its rows)."""
    from transformers import AutoModelForCausalLM

    from rollout.engine import EngineSettings, TeacherEngine

    model = AutoModelForCausalLM.from_pretrained(toy_pair.teacher_dir, dtype=torch.float32).eval()
    V = model.config.vocab_size
    padded = padded_copy(Path(toy_pair.teacher_dir), tmp_path / "teacher", 128)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, V, (3 + i,), generator=g).tolist() for i in range(4)]
    responses = [torch.randint(3, V, (6,), generator=g).tolist() for _ in prompts]
    settings = EngineSettings(
        model_path=str(padded), kv_cache_mb=64, max_model_len=64, teacher_topk=K
    )
    engine = TeacherEngine(settings)
    try:
        assert engine.vocab_size == V
        results = engine.score(prompts, responses)
    finally:
        engine.close()
    for p, r, res in zip(prompts, responses, results, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].float()
        logp_TV = logits.log_softmax(-1)[response_positions(len(p), len(r)).start - 1 : -1]
        ref = logp_TV.topk(K, -1)
        assert torch.tensor(res.topk_ids).tolist() == ref.indices.tolist()
        torch.testing.assert_close(torch.tensor(res.topk_logp), ref.values, rtol=0, atol=1e-4)
        sampled = logp_TV.gather(-1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(res.logp_teacher), sampled, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_padded_pair_trains_and_evaluates_like_the_unpadded_one(ray_local, toy_pair, tmp_path):
    """Two in-process runs, seeded, staleness 0, OPD+ top-K: the toy pair, and copies padded to
    different sizes (student 64 rows, teacher 128). The same samples (ledger checksums), the
    same losses and statistics, the same evaluations: the padded student samples, is scored,
    trains, syncs its padded weights to the sampler and evaluates like the unpadded one."""
    from run_helpers import rows, small_config, step_rows

    from services.driver import train

    student = padded_copy(Path(toy_pair.student_dir), tmp_path / "student", 64, seed=1)
    teacher = padded_copy(Path(toy_pair.teacher_dir), tmp_path / "teacher", 128, seed=2)
    common = {
        "rollout.in_process": "true",
        "rollout.max_staleness": 0,
        "learner.sync_every": 1,
        "distill.teacher_topk": K,
    }
    runs = {}
    for name, extra in (
        ("plain", {}),
        ("padded", {"models.student": f'"{student}"', "models.teacher": f'"{teacher}"'}),
    ):
        cfg = small_config(toy_pair, tmp_path, name, 2, **common, **extra)
        summary = train(cfg, progress=False)
        runs[name] = (summary, step_rows(tmp_path / name), rows(tmp_path / name, "samples.jsonl"))

    (plain, plain_steps, plain_ledger), (padded, padded_steps, padded_ledger) = runs.values()
    same = ("step", "sample_ids", "versions", "response_crc")
    assert [{k: r[k] for k in same} for r in padded_ledger] == [
        {k: r[k] for k in same} for r in plain_ledger
    ]
    keys = [k for k in plain_steps[0] if k.startswith(("distill/", "learner/loss", "learner/grad"))]
    assert "distill/divergence" in keys and "learner/grad_norm" in keys
    for a, b in zip(padded_steps, plain_steps, strict=True):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for when in ("eval_before", "eval_after"):
        got, want = getattr(padded, when), getattr(plain, when)
        assert got["n_problems"] == want["n_problems"] == 4
        for key in ("greedy_acc", "avg_at_k", "examples"):  # examples: the greedy completions
            assert got.get(key) == want.get(key), (when, key)
