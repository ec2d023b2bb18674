"""distill.teacher_topk = "full" wired end to end: the config key, the scored record's hidden
states, their place in the learner's batch, the scorer's sampled-token log-probs and the
learner's exact per-position divergence against transformers, and a toy run that trains on it.

Alignment: the scorer's row t of [R, H] is the teacher's state at sequence position P − 1 + t
(it predicts response token t); the batch's column i holds the state at position i − 1, so
teacher_hidden_BTH[b, P + t] = hidden_RH[t] (learner.batch.collate, rollout.alignment).
"""

from __future__ import annotations

import pytest
import torch

from rollout.records import RecordError, Rollout, ScoredRollout
from services.config import ConfigError, load_config, to_toml
from tests.run_helpers import rows, small_config, step_rows

# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(("raw", "value"), [('"full"', "full"), ("full", "full"), ("8", 8)])
def test_teacher_topk_takes_an_integer_or_full_and_round_trips(raw, value, tmp_path):
    cfg = load_config(None, [f"distill.teacher_topk={raw}"])
    assert cfg.distill.teacher_topk == value
    (tmp_path / "run.toml").write_text(to_toml(cfg))  # as a run stores it
    assert load_config(tmp_path / "run.toml").distill == cfg.distill
    assert load_config(None, []).distill.teacher_topk == 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('"fulll"', "distill.teacher_topk: expected an integer or 'full', got 'fulll'"),
        ("2.5", "distill.teacher_topk: expected an integer or 'full', got 2.5"),
        ("-1", "distill.teacher_topk: must be >= 0"),
    ],
)
def test_a_bad_teacher_topk_names_the_key_and_the_choices(raw, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [f"distill.teacher_topk={raw}"])


def test_full_vocabulary_is_opd_plus_only():
    with pytest.raises(ConfigError, match="distill.teacher_topk = 'full' needs distill.estimator"):
        load_config(None, ['distill.teacher_topk="full"', "distill.estimator=opd"])


def test_learner_settings_carry_the_teacher_folder_and_temperature_for_full(toy_pair):
    from services.parts import learner_settings

    sets = [
        f'models.teacher="{toy_pair.teacher_dir}"',
        f'models.student="{toy_pair.student_dir}"',
        "distill.teacher_temperature=0.5",
    ]
    _, loss = learner_settings(load_config(None, [*sets, 'distill.teacher_topk="full"']))
    assert loss.teacher_head.teacher_path == str(toy_pair.teacher_dir)
    assert loss.teacher_head.teacher_temperature == 0.5
    _, loss = learner_settings(load_config(None, [*sets, "distill.teacher_topk=8"]))
    assert loss.teacher_head is None


# ----------------------------------------------------------------------------- records


def _rollout(sid: str, prompt: tuple, response: tuple) -> Rollout:
    return Rollout(sid, sid.split("/")[0], "", prompt, response, (-1.0,) * len(response), 0, "stop")


def test_a_record_holds_hidden_states_one_row_per_response_token():
    r = _rollout("p/0", (1, 2), (3, 4, 5))
    ScoredRollout(r, (-1.0,) * 3, teacher_hidden=torch.zeros(3, 4))
    for bad in (torch.zeros(2, 4), torch.zeros(3), torch.zeros(3, 4, dtype=torch.int64)):
        with pytest.raises(RecordError, match="p/0: teacher_hidden"):
            ScoredRollout(r, (-1.0,) * 3, teacher_hidden=bad)
    with pytest.raises(RecordError, match="non-finite"):
        ScoredRollout(r, (-1.0,) * 3, teacher_hidden=torch.full((3, 4), float("nan")))
    with pytest.raises(RecordError, match="not come together"):
        ScoredRollout(
            r, (-1.0,) * 3, ((3,), (4,), (5,)), ((-1.0,),) * 3, teacher_hidden=torch.zeros(3, 4)
        )


def test_collate_puts_row_t_of_the_hidden_states_at_column_p_plus_t():
    from learner.batch import collate, split

    a = _rollout("a/0", (1, 2, 3), (4, 5))
    b = _rollout("b/0", (1,), (6, 7, 8, 9))
    h_a = torch.arange(2 * 3, dtype=torch.bfloat16).reshape(2, 3) + 1
    h_b = -torch.arange(4 * 3, dtype=torch.bfloat16).reshape(4, 3) - 1
    batch = collate(
        [
            ScoredRollout(a, (-1.0, -1.0), teacher_hidden=h_a),
            ScoredRollout(b, (-1.0,) * 4, teacher_hidden=h_b),
        ],
        pad_id=0,
    )
    hidden = batch.teacher_hidden_BTH
    assert hidden.shape == (2, 5, 3) and hidden.dtype == torch.bfloat16
    assert torch.equal(hidden[0, 3:5], h_a) and hidden[0, :3].abs().sum() == 0
    assert torch.equal(hidden[1, 1:5], h_b) and hidden[1, 0].abs().sum() == 0
    # Exactly the response columns carry a state.
    assert torch.equal(hidden.abs().sum(-1) != 0, batch.response_mask_BT != 0)
    assert torch.equal(torch.cat([s.teacher_hidden_BTH for s in split(batch, 2)]), hidden)
    with pytest.raises(ValueError, match="some rollouts carry the teacher's hidden states"):
        collate(
            [ScoredRollout(a, (-1.0, -1.0), teacher_hidden=h_a), ScoredRollout(b, (-1.0,) * 4)],
            pad_id=0,
        )


# ------------------------------------------------------------- scorer → learner, real models


@pytest.mark.slow
def test_scorer_and_learner_give_the_teachers_logprobs_and_the_exact_divergence(toy_pair):
    """A hidden-state Scorer (vLLM pooling engine) on the toy teacher, its records collated and
    the learner's loss dispatched to the full-vocabulary path: the records' log π_T of each
    sampled token and the learner's per-token D_f equal a float64 transformers reference of
    both models at the same positions (fails when the hidden states are one column off)."""
    from transformers import AutoModelForCausalLM

    from learner.batch import collate
    from learner.settings import TeacherHeadSettings
    from learner.step import compute_loss, global_normaliser
    from learner.teacher_head import load_teacher_head
    from models.checks import tokenizer_length
    from rollout.engine import EngineSettings
    from rollout.scorer import Scorer
    from tests.learner_settings import loss_settings

    tau_t = 0.8
    V = tokenizer_length(toy_pair.teacher_dir)
    g = torch.Generator().manual_seed(0)
    rollouts = [
        _rollout(
            f"q{i}/0",
            (1, *torch.randint(3, V, (2 + i,), generator=g).tolist()),
            tuple(torch.randint(3, V, (3 + 2 * i,), generator=g).tolist()),
        )
        for i in range(3)
    ]
    settings = EngineSettings(
        model_path=str(toy_pair.teacher_dir), kv_cache_mb=64, max_model_len=64,
        teacher_topk="full", teacher_temperature=tau_t,
    )  # fmt: skip
    scorer = Scorer.build(settings)
    try:
        scored, _ = scorer.score(rollouts)
    finally:
        scorer.close()

    models = {
        name: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
        for name, folder in (("teacher", toy_pair.teacher_dir), ("student", toy_pair.student_dir))
    }

    def reference_logp(name, seq, temperature):
        with torch.no_grad():
            logits = models[name](input_ids=torch.tensor([seq])).logits[0, :, :V]
        return (logits / temperature).log_softmax(-1)  # row i: π(· | x_≤i)

    student = AutoModelForCausalLM.from_pretrained(toy_pair.student_dir, dtype=torch.float32)
    divergence = "js"
    d_ref, n = 0.0, 0
    for r, s in zip(rollouts, scored, strict=True):
        seq = list(r.prompt_ids + r.response_ids)
        P, R = len(r.prompt_ids), len(r.response_ids)
        assert s.teacher_hidden.shape == (R, 128)  # the toy teacher's H (its student's: 96)
        t_logp = reference_logp("teacher", seq, tau_t)[P - 1 : P + R - 1]
        s_logp = reference_logp("student", seq, 1.0)[P - 1 : P + R - 1]
        sampled = t_logp.gather(-1, torch.tensor(r.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(
            torch.tensor(s.logp_teacher, dtype=torch.float64), sampled, rtol=0, atol=1e-4
        )
        p, q = s_logp.exp(), t_logp.exp()
        m = 0.5 * (p + q)
        js = 0.5 * (p * (s_logp - m.log())).sum(-1) + 0.5 * (q * (t_logp - m.log())).sum(-1)
        d_ref, n = d_ref + float(js.sum()), n + R

    batch = collate(scored, pad_id=0)
    settings = loss_settings(
        divergence=divergence, ratio_clip=None, logprob_chunk=64,
        teacher_head=TeacherHeadSettings(str(toy_pair.teacher_dir), tau_t),
    )  # fmt: skip
    head = load_teacher_head(toy_pair.teacher_dir, vocab_size=V)
    loss, stats = compute_loss(
        student, batch, settings=settings, normaliser=global_normaliser(batch, "token_mean"),
        vocab_size=V, teacher_head=head,
    )  # fmt: skip
    loss.backward()
    assert stats.num_tokens == n
    assert stats.divergence == pytest.approx(d_ref / n, rel=1e-4, abs=1e-6)
    assert stats.mismatch > 0  # the records' sampler log-probs are the placeholder -1


# ----------------------------------------------------------------------------- a run


@pytest.mark.slow
def test_a_full_vocabulary_run_trains_with_a_clean_ledger(ray_local, toy_pair, tmp_path):
    from services.driver import train
    from services.ledger import check_ledger

    cfg = small_config(
        toy_pair,
        tmp_path,
        "full",
        3,
        **{
            "rollout.in_process": "true",
            "rollout.max_staleness": 0,
            "learner.sync_every": 1,
            "distill.teacher_topk": '"full"',
        },
    )
    train(cfg, progress=False)
    run_dir = tmp_path / "full"
    steps = step_rows(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["distill/mismatch"] < 1e-4 for r in steps), [r["distill/mismatch"] for r in steps]
    assert all(0 < r["distill/divergence"] < 1 for r in steps), steps
    assert [sorted(set(r["versions"])) for r in rows(run_dir, "samples.jsonl")] == [[0], [1], [2]]
    report = check_ledger(run_dir)
    assert report.ok, report.problems
