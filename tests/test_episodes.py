"""Episodes in the records and the learner batch (issue 22, docs/math.md §10): the student mask
travels from `Rollout.episode` into `TrainBatch.student_mask_BT` at the response columns, and
the learner step (sampled, top-K and full-vocabulary paths) takes costs, score terms, its
normaliser and its IS / mismatch statistics over the student's tokens only."""

import collections
import dataclasses
import random
import types

import pytest
import torch
from learner_settings import loss_of
from test_step import VOCAB, tiny_llama

from learner.batch import collate, split
from learner.dense import full_dense_surrogate_loss
from learner.step import global_normaliser, merge_metrics
from rollout.alignment import token_logprobs
from rollout.records import Episode, RecordError, Rollout, ScoredRollout

K = 3


def episode_rollout(i: int, turns, R: int, *, seed: int = 0, topk: bool = False, env_shift=0.0):
    """A scored episode: prompt of 2 + i % 2 tokens, R response tokens whose student turns are
    `turns`; random log-probs (0.0 for the sampler at environment tokens). env_shift is added
    to the teacher's log-probs (and top-K) at environment tokens only."""
    g = torch.Generator().manual_seed(seed * 100 + i)
    P = 2 + i % 2
    ids = torch.randint(0, VOCAB, (P + R,), generator=g).tolist()
    student = [0] * R
    for a, b in turns:
        student[a:b] = [1] * (b - a)
    sampler = [(-2.0 - torch.rand(1, generator=g).item()) * m for m in student]
    teacher = [-1.0 - torch.rand(1, generator=g).item() - env_shift * (1 - m) for m in student]
    rollout = Rollout(
        sample_id=f"p{i}/0",
        problem_id=f"p{i}",
        answer="",
        prompt_ids=tuple(ids[:P]),
        response_ids=tuple(ids[P:]),
        logp_sampler=tuple(sampler),
        policy_version=0,
        finish_reason="stop",
        episode=Episode(turns=tuple(turns), tool_calls=len(turns) - 1),
    )
    if not topk:
        return ScoredRollout(rollout=rollout, logp_teacher=tuple(teacher))
    top_ids = tuple(
        tuple(torch.randperm(VOCAB, generator=g)[:K].tolist()) for _ in range(R)
    )  # fmt: skip
    top_logp = tuple(
        tuple(-1.5 - k - env_shift * (1 - m) for k in range(K)) for m in student
    )  # fmt: skip
    return ScoredRollout(
        rollout=rollout,
        logp_teacher=tuple(teacher),
        teacher_topk_ids=top_ids,
        teacher_topk_logp=top_logp,
    )


EPISODES = [((0, 3), (5, 8)), ((0, 2), (4, 5), (7, 9)), ((0, 4),)]
LENGTHS = [9, 10, 6]  # the last one ends with two environment tokens


def episode_batch(*, topk=False, env_shift=0.0, seed=0):
    scored = [
        episode_rollout(i, t, R, seed=seed, topk=topk, env_shift=env_shift)
        for i, (t, R) in enumerate(zip(EPISODES, LENGTHS, strict=True))
    ]
    return collate(scored, pad_id=0)


# ---------------------------------------------------------------- records


def test_episode_record_checks_its_turns_and_the_environment_logprobs():
    base = episode_rollout(0, ((0, 3), (5, 8)), 9).rollout
    fields = {f: getattr(base, f) for f in base.__slots__}
    assert base.student_mask == (1, 1, 1, 0, 0, 1, 1, 1, 0)
    for turns in [((0, 3), (2, 5)), ((0, 3), (5, 10)), ((3, 3),), ((5, 8), (0, 3))]:
        with pytest.raises(RecordError, match="not disjoint"):
            Rollout(**{**fields, "episode": Episode(turns=turns)})
    with pytest.raises(RecordError, match="environment token"):
        logps = list(base.logp_sampler)
        logps[3] = -0.5  # the sampler did not draw an environment token
        Rollout(**{**fields, "logp_sampler": tuple(logps)})
    with pytest.raises(RecordError, match="not a count"):
        Rollout(**{**fields, "episode": Episode(turns=((0, 3),), tool_calls=1, tool_errors=2)})
    single = Rollout(**{**fields, "episode": None})
    assert single.student_mask is None


# ---------------------------------------------------------------- the batch


def test_collate_places_the_student_mask_at_the_response_columns():
    batch = episode_batch()
    for b, (turns, R) in enumerate(zip(EPISODES, LENGTHS, strict=True)):
        P = 2 + b % 2
        row = batch.student_mask_BT[b].tolist()
        want = [0.0] * P + [0.0] * R + [0.0] * (batch.input_ids_BT.shape[1] - P - R)
        for a, e in turns:
            want[P + a : P + e] = [1.0] * (e - a)
        assert row == want, b
    student = sum(e - a for turns in EPISODES for a, e in turns)
    assert batch.num_student_tokens == student < batch.num_response_tokens
    assert global_normaliser(batch, "token_mean") == student
    # Shards keep their rows' masks.
    shards = split(batch, 2)
    assert torch.equal(torch.cat([s.student_mask_BT for s in shards]), batch.student_mask_BT)


def test_a_batch_without_episodes_has_no_student_mask_and_a_mixed_one_marks_single_turns():
    scored = [
        episode_rollout(i, t, R) for i, (t, R) in enumerate(zip(EPISODES, LENGTHS, strict=True))
    ]
    plain = [
        dataclasses.replace(s, rollout=dataclasses.replace(s.rollout, episode=None)) for s in scored
    ]
    # Without an episode the sampler log-probs at former environment tokens may be anything.
    assert collate(plain, pad_id=0).student_mask_BT is None
    mixed = collate([plain[0], scored[1]], pad_id=0)
    P0, R0 = 2, LENGTHS[0]
    assert mixed.student_mask_BT[0].tolist()[P0 : P0 + R0] == [1.0] * R0
    assert mixed.student_mask_BT[0].sum() == R0
    assert mixed.num_student_tokens == R0 + sum(e - a for a, e in EPISODES[1])


# ---------------------------------------------------------------- the learner step


def _loss_and_grads(batch, **settings):
    model = tiny_llama()
    n = global_normaliser(batch, settings.get("aggregation", "token_mean"))
    loss, stats = loss_of(model, batch, normaliser=n, **settings)
    loss.backward()
    return loss.item(), stats, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("topk", [False, True], ids=["sampled", "topk"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_environment_tokens_reach_no_loss_and_no_statistic(topk, aggregation):
    """Changing the teacher's values at the environment's tokens changes nothing (γ = 0.5, so
    the future costs run across turns); the statistics count the student's tokens only."""
    settings = dict(divergence="js", discount=0.5, aggregation=aggregation)
    loss_a, stats_a, grads_a = _loss_and_grads(episode_batch(topk=topk), **settings)
    loss_b, stats_b, grads_b = _loss_and_grads(episode_batch(topk=topk, env_shift=3.0), **settings)
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert stats_a == stats_b
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    batch = episode_batch(topk=topk)
    assert stats_a.num_tokens == batch.num_student_tokens
    # The mismatch by hand over the student's tokens (the sampler has none at the others).
    model = tiny_llama()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits
        learner_BT = token_logprobs(logits, batch.input_ids_BT)
    keep = batch.student_response_mask_BT.bool()
    want = (learner_BT - batch.logp_sampler_BT)[keep].abs().mean().item()
    assert stats_a.mismatch == pytest.approx(want, rel=1e-5)


def test_shards_of_an_episode_batch_sum_to_the_full_batch():
    batch = episode_batch()
    n = global_normaliser(batch, "token_mean")
    full, full_stats = loss_of(tiny_llama(), batch, normaliser=n, discount=0.5)
    parts = [loss_of(tiny_llama(), s, normaliser=n, discount=0.5) for s in split(batch, 3)]
    assert sum(p[0].item() for p in parts) == pytest.approx(full.item(), rel=1e-5)
    merged = merge_metrics([p[1].metrics() for p in parts])
    assert merged["learner/tokens"] == full_stats.num_tokens == batch.num_student_tokens
    assert merged["distill/mismatch"] == pytest.approx(full_stats.mismatch, rel=1e-5)


def test_full_vocabulary_loss_ignores_the_environment_positions():
    """The full-vocabulary path's loss (`full_dense_surrogate_loss`, what `full_batch_loss`
    calls with the batch's student mask): D at environment positions reaches nothing."""
    batch = episode_batch()
    g = torch.Generator().manual_seed(3)
    d_BT = torch.rand(batch.input_ids_BT.shape, generator=g, dtype=torch.float64)
    logp_BT = -torch.rand(batch.input_ids_BT.shape, generator=g, dtype=torch.float64)
    env_BT = (batch.response_mask_BT - batch.student_response_mask_BT).bool()
    results = []
    for shift in (0.0, 5.0):
        d = (d_BT + shift * env_BT).requires_grad_()
        logp = logp_BT.clone().requires_grad_()
        loss, _ = full_dense_surrogate_loss(
            d,
            logp,
            batch.logp_sampler_BT.double(),
            batch.response_mask_BT,
            discount=0.5,
            normaliser=global_normaliser(batch, "token_mean"),
            student_mask_BT=batch.student_mask_BT,
        )
        loss.backward()
        results.append((loss.item(), d.grad, logp.grad))
    (la, da, pa), (lb, db, pb) = results
    assert la == pytest.approx(lb, abs=1e-12)
    torch.testing.assert_close(da, db)
    torch.testing.assert_close(pa, pb)
    assert not da[env_BT].any() and not pa[env_BT].any()


# ---------------------------------------------------------------- config


def test_environment_keys_are_checked_with_did_you_mean():
    from services.config import ConfigError, describe, load_config

    cfg = load_config(None, ['task.environment="calculator"', "rollout.max_turns=3"])
    assert (cfg.task.environment, cfg.rollout.max_turns) == ("calculator", 3)
    with pytest.raises(ConfigError, match="task.environment: .*did you mean 'calculator'"):
        load_config(None, ['task.environment="calcualtor"'])
    with pytest.raises(ConfigError, match="task.environment_system: .*set task.environment"):
        load_config(None, ['task.environment_system="use <calc>"'])
    with pytest.raises(ConfigError, match="rollout.max_episode_tokens"):
        load_config(None, ['task.environment="python"', "rollout.max_episode_tokens=256"])
    docs = {key: doc for key, _, doc in describe(type(cfg))}
    assert "calculator: <calc>EXPR</calc>" in docs["task.environment"]


# ---------------------------------------------------------------- metrics and ledger


def test_episode_metrics_and_the_ledger_checksum_cover_the_environment_tokens():
    import zlib

    from rollout.episodes import episode_metrics
    from services.ledger import response_crc

    a = episode_rollout(0, ((0, 3), (5, 8)), 9).rollout
    b = dataclasses.replace(a, episode=Episode(((0, 3), (5, 8)), tool_calls=0, cut=True))
    m = episode_metrics([a, b])
    assert m["episode/turns_mean"] == 2 and m["episode/tool_calls_mean"] == 0.5
    assert m["episode/tool_call_rate"] == 0.5 and m["episode/cut_frac"] == 0.5
    assert (m["episode/student_tokens"], m["episode/environment_tokens"]) == (12, 6)
    assert episode_metrics([dataclasses.replace(a, episode=None)]) == {}
    # A different tool answer (environment token 3) or the same ids split differently into
    # turns changes the checksum; a single-turn response keeps the checksum of its ids.
    ids = list(a.response_ids)
    ids[3] = (ids[3] + 1) % VOCAB
    assert response_crc(dataclasses.replace(a, response_ids=tuple(ids))) != response_crc(a)
    logps = a.logp_sampler[:3] + (-1.0,) + a.logp_sampler[4:]
    moved = dataclasses.replace(a, logp_sampler=logps, episode=Episode(((0, 4), (5, 8))))
    assert response_crc(moved) != response_crc(a)
    plain = dataclasses.replace(a, episode=None)
    assert response_crc(plain) == zlib.crc32(",".join(map(str, a.response_ids)).encode())


# ---------------------------------------------------------------- rendering an answer

# A toy chat template (the toy vocabulary has no letters): user turns "TEXT;", assistant turns
# "+TEXT;" (the generation prompt is the "+"), tool turns "=TEXT#".
TOOL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}={{ m['content'] }}#"
    "{% elif m['role'] == 'assistant' %}+{{ m['content'] }};"
    "{% else %}{{ m['content'] }};{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}+{% endif %}"
)
# Drops an assistant turn's text once another turn follows it (as templates that strip an
# earlier turn's reasoning do): the student's tokens would no longer be a prefix.
UNSTABLE = TOOL_TEMPLATE.replace(
    "+{{ m['content'] }};", "+{% if loop.last %}{{ m['content'] }}{% endif %};"
)


def test_an_environment_answer_is_rendered_after_the_students_tokens(toy_pair, tmp_path):
    from test_chat_data import _tokenizer_dir

    from rollout.prompting import (
        PromptError,
        Turn,
        encode_environment_answer,
        encode_prompt,
    )

    turns = [Turn("assistant", "34")]
    answer = [Turn("tool", "56")]
    chat = _tokenizer_dir(toy_pair, tmp_path / "chat", TOOL_TEMPLATE)
    ids = encode_prompt(chat, "12") + chat.encode("34", add_special_tokens=False)
    ids += encode_environment_answer(chat, "12", turns, answer)
    assert chat.decode(ids) == "<bos>12;+34;=56#+"  # the whole chat, as the template renders it
    unstable = _tokenizer_dir(toy_pair, tmp_path / "unstable", UNSTABLE)
    with pytest.raises(PromptError, match="renders the episode so far differently"):
        encode_environment_answer(unstable, "12", turns, answer)
    plain = _tokenizer_dir(toy_pair, tmp_path / "plain", None)
    got = encode_environment_answer(plain, "12", turns, answer)
    assert got == plain.encode("[56]", add_special_tokens=False)
    with pytest.raises(PromptError, match="shows only tool answers"):
        encode_environment_answer(plain, "12", turns, [Turn("user", "1")])


# ---------------------------------------------------------------- the sampler's seeds


# rollout.engine.Generation's fields (importing rollout.engine imports vLLM: seconds).
Generation = collections.namedtuple(
    "Generation", ["token_ids", "logprobs", "finish_reason", "stop_string"]
)


class SeededEngine:
    """A test double of the student engine whose completion of a sequence depends only on its
    seed: random characters of the toy vocabulary, ending at a stop string or the limit."""

    version = 0

    def __init__(self, model_dir) -> None:
        from transformers import AutoTokenizer

        self.settings = types.SimpleNamespace(max_model_len=256, model_path=str(model_dir))
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))

    def generate(self, prompt_ids, *, max_tokens, temperature, n, seed, stop):
        out = []
        for limit, s in zip(max_tokens, seed, strict=True):
            rng = random.Random(s)
            text = "".join(rng.choice("0123456789+=") for _ in range(limit))
            ends = [j for j, c in enumerate(text) if c in stop]
            cut = ends[0] + 1 if ends else limit
            ids = tuple(self.tok.encode(text[:cut], add_special_tokens=False))
            reason = text[cut - 1] if ends else None
            finish = "stop" if ends else "length"
            out.append([Generation(ids, (-1.0,) * len(ids), finish, reason)])
        return out


def test_an_episode_depends_on_its_prompts_seed_not_on_its_chunk(toy_pair):
    """A re-dispatched group may sit at another position of another chunk (its chunk seed
    shifted to match): its episodes, tool answers included, are the same."""
    from test_episodes_sampler import PLUS, items_for, problems

    from rollout.environments import EnvironmentOptions
    from rollout.episodes import EpisodeSettings
    from rollout.sampler import Sampler, SampleRequest

    sampler = Sampler(SeededEngine(toy_pair.student_dir))
    settings = EpisodeSettings(PLUS, EnvironmentOptions(seed=0), max_turns=3, max_episode_tokens=40)
    items = items_for(settings, sampler.tokenizer, problems(3))
    req = SampleRequest(n=2, max_tokens=12, temperature=1.0, seed=11, episodes=settings)
    whole = dict(sampler.sample(items, req))
    alone = dict(sampler.sample(items[2:], dataclasses.replace(req, seed=13)))
    assert whole[2] == alone[0]
    assert sum(r.episode.tool_calls for g in whole.values() for r in g) > 0


def test_a_call_left_open_at_the_budget_is_cut_and_counted(toy_pair):
    from test_episodes_sampler import NEVER, items_for, problems

    from rollout.environments import EnvironmentOptions
    from rollout.episodes import EpisodeSettings, episode_metrics
    from rollout.sampler import Sampler, SampleRequest

    sampler = Sampler(SeededEngine(toy_pair.student_dir))
    settings = EpisodeSettings(NEVER, EnvironmentOptions(seed=0), max_turns=3, max_episode_tokens=6)
    items = items_for(settings, sampler.tokenizer, problems(4))
    req = SampleRequest(n=2, max_tokens=12, temperature=1.0, seed=3, episodes=settings)
    done = [r for _, group in sampler.sample(items, req) for r in group]
    for r in done:
        assert len(r.response_ids) == 6 and r.finish_reason == "length"
        assert r.episode.turns == ((0, 6),) and r.episode.tool_calls == 0
        text = sampler.tokenizer.decode(list(r.response_ids))
        assert r.episode.cut == ("+" in text and "#?" not in text[text.rfind("+") :])
    assert 0 < episode_metrics(done)["episode/cut_frac"] < 1
