"""Prompt sources: determinism, exact resume, clear errors on bad input, scoring."""

from __future__ import annotations

import json

import pytest

from rollout import tasks
from rollout.sources import Problem, SourceError, make_source, score


def _write_jsonl(path, records_or_lines):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records_or_lines]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def jsonl_file(tmp_path):
    return _write_jsonl(
        tmp_path / "probs.jsonl", [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(30)]
    )


def _sources(jsonl_file):
    return {
        "arithmetic": lambda seed=0: make_source("arithmetic", seed=seed),
        "add_sub": lambda seed=0: make_source("arithmetic", seed=seed, task="add_sub"),
        "jsonl": lambda seed=0: make_source("jsonl", path=jsonl_file, seed=seed),
        "reasoning_gym": lambda seed=0: make_source("reasoning_gym", task="chain_sum", seed=seed),
    }


@pytest.mark.parametrize("kind", ["arithmetic", "add_sub", "jsonl", "reasoning_gym"])
def test_deterministic_and_resumable(kind, jsonl_file):
    build = _sources(jsonl_file)[kind]
    a = build()
    stream = a.next_batch(7) + a.next_batch(40)  # jsonl: crosses an epoch boundary
    assert stream == build().next_batch(47)

    b = build()
    b.next_batch(7)
    saved = json.loads(json.dumps(b.state()))  # states survive a JSON round trip
    expected = b.next_batch(40)
    c = build()
    c.restore(saved)
    assert c.next_batch(40) == expected == stream[7:]

    assert build(seed=1).next_batch(47) != stream
    assert all(isinstance(p, Problem) and p.prompt and p.answer for p in stream)


@pytest.mark.parametrize("kind", ["arithmetic", "add_sub", "jsonl", "reasoning_gym"])
def test_eval_set_fixed_and_disjoint_from_training(kind, jsonl_file):
    build = _sources(jsonl_file)[kind]
    ev = build().eval_set()
    assert ev and ev == build().eval_set()
    assert len({p.id for p in ev}) == len(ev)
    train_prompts = {p.prompt for p in build().next_batch(300)}
    assert not train_prompts & {p.prompt for p in ev}


def test_arithmetic_eval_set_is_the_task_eval_set():
    ev = make_source("arithmetic").eval_set()
    assert [p.prompt for p in ev] == [p.prompt for p in tasks.eval_problems()]
    assert len(ev) == 200


def test_restore_refuses_a_foreign_state(jsonl_file):
    src = make_source("arithmetic", seed=0)
    with pytest.raises(SourceError, match="seed"):
        src.restore(make_source("arithmetic", seed=1).state())
    with pytest.raises(SourceError, match="kind"):
        src.restore(make_source("jsonl", path=jsonl_file).state())
    with pytest.raises(SourceError, match="position"):
        src.restore({**src.state(), "position": -1})


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(SourceError, match=r"nope\.jsonl: no such file"):
        make_source("jsonl", path=tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(SourceError, match=r"empty\.jsonl: no usable records"):
        make_source("jsonl", path=empty)


@pytest.mark.parametrize(
    "bad_line, why",
    [
        ('{"prompt": "1+1=", "answer": 2', "invalid JSON"),
        ('["1+1=", 2]', "expected a JSON object"),
        ('{"answer": 2}', "record has no non-empty string 'prompt'"),
        ('{"prompt": "", "answer": 2}', "record has no non-empty string 'prompt'"),
        ('{"prompt": 5, "answer": 2}', "record has no non-empty string 'prompt'"),
        ('{"prompt": "1+1="}', "record has no 'answer'"),
        ('{"prompt": "1+1=", "answer": null}', "record has no 'answer'"),
    ],
)
def test_malformed_line_names_file_line_and_why(tmp_path, bad_line, why):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+2=", "answer": 3}, "", bad_line])
    with pytest.raises(SourceError) as err:
        make_source("jsonl", path=path)
    assert f"bad.jsonl:3: {why}" in str(err.value)


def test_long_prompts_are_skipped_and_counted(tmp_path):
    records = [
        {"prompt": "1+1=", "answer": 2},
        {"prompt": "x" * 50, "answer": 1},
        {"prompt": "2+2=", "answer": 4},
    ]
    src = make_source(
        "jsonl", path=_write_jsonl(tmp_path / "p.jsonl", records), max_prompt_chars=10
    )
    assert src.skipped == 1
    assert {p.prompt for p in src.next_batch(10)} == {"1+1=", "2+2="}

    only_long = _write_jsonl(tmp_path / "long.jsonl", [{"prompt": "x" * 50, "answer": 1}])
    with pytest.raises(SourceError, match="1 prompts longer than 10 chars skipped"):
        make_source("jsonl", path=only_long, max_prompt_chars=10)

    arith = make_source("arithmetic", max_prompt_chars=6)
    batch = arith.next_batch(100)
    assert all(len(p.prompt) <= 6 for p in batch) and arith.skipped > 0
    assert arith.state()["skipped"] == arith.skipped

    rg = make_source("reasoning_gym", task="chain_sum", max_prompt_chars=140)
    batch = rg.next_batch(20)
    assert all(len(p.prompt) <= 140 for p in batch) and rg.skipped > 0

    with pytest.raises(
        SourceError, match="consecutive prompts were longer than max_prompt_chars=3"
    ):
        make_source("arithmetic", max_prompt_chars=3).next_batch(1)


def test_factory_errors(tmp_path):
    with pytest.raises(SourceError, match="unknown source kind 'csv'"):
        make_source("csv")
    with pytest.raises(SourceError, match="needs task.path"):
        make_source("jsonl")
    with pytest.raises(SourceError, match="needs task.name"):
        make_source("reasoning_gym")
    with pytest.raises(SourceError, match="not_a_task"):
        make_source("reasoning_gym", task="not_a_task")
    with pytest.raises(SourceError, match="unknown arithmetic task"):
        make_source("arithmetic", task="mul")
    with pytest.raises(SourceError, match="max_prompt_chars"):
        make_source("arithmetic", max_prompt_chars=0)
    assert isinstance(SourceError("x"), ValueError)


def test_score_each_source(jsonl_file):
    arith = make_source("arithmetic").next_batch(1)[0]
    assert score(arith, f"...#{arith.answer}") == 1.0
    assert score(arith, "...#-1") == 0.0

    row = make_source("jsonl", path=jsonl_file).next_batch(1)[0]
    assert row.source == "jsonl:probs"
    assert score(row, f"#{row.answer}") == 1.0 and score(row, row.answer) == 0.0

    rg = make_source("reasoning_gym", task="chain_sum").next_batch(1)[0]
    assert rg.source == "reasoning_gym:chain_sum"
    assert score(rg, f"so <answer>{rg.answer}</answer>") == 1.0
    assert score(rg, "<answer>nonsense</answer>") == 0.0
    assert score(rg, rg.answer) == 0.0  # no tags: not extracted

    with pytest.raises(SourceError, match="unknown source"):
        score(Problem(id="x", prompt="p", answer="1", source="m", kind="mystery"), "#1")


def test_reasoning_gym_task_config_reaches_the_task():
    src = make_source(
        "reasoning_gym",
        task="chain_sum",
        task_config={"min_terms": 2, "max_terms": 2, "max_digits": 1},
    )
    for p in src.next_batch(10):
        expr = p.prompt.split(":")[-1].split("=")[0]
        assert len(expr.replace("-", "+").split("+")) == 2
        assert score(p, f"<answer>{p.answer}</answer>") == 1.0


def test_registered_source_is_usable_everywhere(tmp_path):
    """A new kind registers once; make_source, score and config validation all accept it."""
    from rollout import sources
    from services.config import ConfigError, load_config

    class Fixed:
        skipped = 0

        def __init__(self, o):
            self.seed = o.seed

        def next_batch(self, n):
            return [Problem(f"fx:{i}", "q", "yes", "fixed", "fixed") for i in range(n)]

        def state(self):
            return {"position": 0}

        def restore(self, state):
            pass

        def eval_set(self):
            return self.next_batch(2)

    kind = sources.SourceKind(
        name="fixed",
        doc="test source",
        build=Fixed,
        verifier="exact",
        requires=("path",),
    )
    sources.register_source(kind)
    try:
        with pytest.raises(ValueError, match="already registered"):
            sources.register_source(kind)
        src = make_source("fixed", path="x")
        (p,) = src.next_batch(1)
        assert score(p, "yes") == 1.0 and score(p, "no") == 0.0
        cfg_file = tmp_path / "c.toml"
        cfg_file.write_text('[task]\nsource = "fixed"\npath = "x"\n')
        assert load_config(cfg_file, []).task.source == "fixed"
        cfg_file.write_text('[task]\nsource = "fixed"\n')
        with pytest.raises(ConfigError, match="task.path"):
            load_config(cfg_file, [])
    finally:
        del sources.SOURCES["fixed"]
    with pytest.raises(ConfigError, match="task.source.*fixed"):
        load_config(cfg_file, [])


# ----------------------------------------------------------------------------- token limit


def _chars(text: str) -> list[int]:
    """A stand-in tokenizer for the wrapper's own logic: one token per character (the real
    student tokenizer is used in tests/test_inprocess.py's run)."""
    return [ord(c) for c in text]


def test_prompts_too_long_in_tokens_are_skipped_and_counted(tmp_path):
    from rollout.sources import TokenLimitedSource, skipped_metrics

    records = [{"prompt": "x" * (3 + i % 7), "answer": 1, "id": str(i)} for i in range(40)]
    path = _write_jsonl(tmp_path / "p.jsonl", records)

    def build():
        return TokenLimitedSource(
            make_source("jsonl", path=path), _chars, max_prompt_tokens=6, max_eval_tokens=4
        )

    a = build()
    first = a.next_batch(5)
    assert all(len(p.prompt) <= 6 for p in first) and len(first) == 5
    state = a.state()
    assert state["skipped_tokens"] > 0
    assert skipped_metrics(state)["data/skipped_long_tokens"] == state["skipped_tokens"]
    rest = a.next_batch(9)
    # Exactly the stream an uninterrupted source gives, also across a restore.
    b = build()
    b.restore(state)
    assert b.next_batch(9) == rest and b.skipped_tokens == a.skipped_tokens
    assert build().next_batch(14) == first + rest
    assert all(len(p.prompt) <= 4 for p in a.eval_set())
    assert a.eval_skipped_tokens == len(make_source("jsonl", path=path).eval_set()) - len(
        a.eval_set()
    )


def test_all_prompts_too_long_in_tokens_is_a_clear_error(tmp_path):
    from rollout.sources import TokenLimitedSource

    path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 50, "answer": 1}] * 5)
    src = TokenLimitedSource(
        make_source("jsonl", path=path), _chars, max_prompt_tokens=10, max_eval_tokens=10
    )
    with pytest.raises(SourceError, match="longer than 10 tokens.*rollout.max_model_len"):
        src.next_batch(1)
    with pytest.raises(SourceError, match="no room for a prompt"):
        TokenLimitedSource(src, _chars, max_prompt_tokens=0, max_eval_tokens=1)


def test_bad_data_stops_a_run_without_a_resume_hint():
    """A SourceError replays on resume (the same seeded batch): the driver does not offer to
    resume (stop_reason None: the error keeps its own message); other rollout failures do."""
    from services.channel import RolloutError
    from services.driver import stop_reason

    try:
        try:
            raise SourceError("p.jsonl:3: record has no 'answer'")
        except SourceError as exc:
            raise RolloutError(f"rollout producer failed: {exc}") from exc
    except RolloutError as err:
        assert stop_reason(err) is None
    try:
        try:
            raise RuntimeError("sampler-1 died")
        except RuntimeError as exc:
            raise RolloutError("a worker kept failing") from exc
    except RolloutError as err:
        assert stop_reason(err) == "the rollout tier failed: sampler-1 died"


def test_reasoning_gym_eval_collisions_end_in_an_error():
    """A task whose every question is in the eval set: bounded attempts, then a clear error
    (it used to loop forever)."""
    from rollout.sources import ReasoningGymSource

    tiny = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
    src = ReasoningGymSource("chain_sum", task_config=tiny, eval_size=1500)
    src.max_collisions = 300  # the default (10 000) takes a few seconds to reach
    with pytest.raises(SourceError, match="300 training items in a row are questions of the eval"):
        src.next_batch(5)
