"""The chat source (rollout/chat_data.py) on real files, the prompt rendering of chats
(rollout/prompting.py) on real tokenizers, and one short in-process run on a Parquet chat
dataset (system prompts, two-turn histories) with a clean ledger."""

from __future__ import annotations

import json
import shutil

import pytest

from rollout import chat_data, tasks
from rollout.prompting import Chat, PromptError, RenderingMismatch, check_same_rendering
from rollout.sources import SourceError, make_source, sample_problems, score
from rollout.verifiers import VerifierError

SYSTEM = "Add."


def chat_rows(n: int, seed: int = 3) -> list[dict]:
    """Arithmetic chats: system + user, two-turn histories, plain prompts, prompt-only rows."""
    gen = tasks.ArithmeticGenerator(seed=seed)
    rows = []
    for i in range(n):
        p = gen.next()
        if i % 4 == 0:
            row = {"messages": [{"role": "system", "content": SYSTEM}, _user(p.prompt)]}
        elif i % 4 == 1:
            q = gen.next()
            history = [_user(q.prompt), {"role": "assistant", "content": q.completion()}]
            row = {"messages": [{"role": "system", "content": SYSTEM}, *history, _user(p.prompt)]}
        elif i % 4 == 2:
            row = {"prompt": p.prompt}
        else:
            row = {"messages": [_user(p.prompt)]}
        if i % 8 != 7:  # every eighth row is prompt-only
            row["answer"] = p.answer
        rows.append(row)
    return rows


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _table(rows):
    """A table with every row's columns (from_pylist takes the first row's keys only)."""
    import pyarrow as pa

    keys = list(dict.fromkeys(k for r in rows for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])


def write_parquet(path, rows, row_group_size=7):
    import pyarrow.parquet as pq

    pq.write_table(_table(rows), path, row_group_size=row_group_size)
    return path


def write_arrow_folder(path, rows, batch=5):
    """The layout ``datasets.Dataset.save_to_disk`` writes: Arrow stream files + state.json."""
    import pyarrow as pa

    path.mkdir()
    table = _table(rows)
    file = str(path / "data-00000-of-00001.arrow")
    with pa.OSFile(file, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for b in table.to_batches(max_chunksize=batch):
            writer.write_batch(b)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}
    (path / "state.json").write_text(json.dumps(state))
    return path


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(chat_data, "JSONL_BLOCK", 6)  # several blocks in a small file


def _stream(src, n=90):
    return [(p.id, p.prompt, p.answer) for p in src.next_batch(n)]


def test_jsonl_parquet_and_folder_give_the_same_source(tmp_path, small_blocks):
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(chat_rows(40))]
    files = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", rows),
        "parquet": write_parquet(tmp_path / "d.parquet", rows),
        "folder": write_arrow_folder(tmp_path / "d", rows),
    }
    sources = {k: make_source("chat", path=f, seed=4) for k, f in files.items()}
    evals = {k: [(p.id, p.prompt, p.answer) for p in s.eval_set()] for k, s in sources.items()}
    assert evals["jsonl"] == evals["parquet"] == evals["folder"] and evals["jsonl"]
    # Blocks differ by format (6 lines, 7-row groups, 6-row slices): the deal may differ, the
    # rows dealt per epoch may not: every training row once per epoch.
    for src in sources.values():
        epoch = src.next_batch(src.counts["train"])
        assert len({p.id for p in epoch}) == src.counts["train"] == 40 - src.counts["eval"]
        assert not {p.id for p in epoch} & {e[0] for e in evals["jsonl"]}
    chats = [p.prompt for p in sources["parquet"].eval_set()]
    assert all(isinstance(c, Chat) and c.turns[-1].role == "user" for c in chats)


def test_a_folder_written_by_datasets_save_to_disk(tmp_path):
    """Interop with the real library (installed with the `bench` extra; skipped without it)."""
    datasets = pytest.importorskip("datasets")
    rows = [dict(r, id=f"r{i}") for i, r in enumerate(chat_rows(30))]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in keys} for r in rows])
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(tmp_path / "dd")
    with pytest.raises(SourceError, match=r"DatasetDict folder with splits \['train', 'test'\]"):
        make_source("chat", path=tmp_path / "dd")
    src = make_source("chat", path=tmp_path / "dd" / "train", eval_path=tmp_path / "dd" / "test")
    ref = make_source("chat", path=write_jsonl(tmp_path / "d.jsonl", rows), eval_path=None)
    assert [p.id for p in src.eval_set()] == [f"chat:r{i}" for i in range(5) if i % 8 != 7]
    assert src.counts["train"] == 30
    by_id = {p.id: p for p in ref.next_batch(60) + ref.eval_set()}
    for p in src.next_batch(30):
        assert (p.prompt, p.answer) == (by_id[p.id].prompt, by_id[p.id].answer)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_deterministic_resumable_across_epochs(tmp_path, small_blocks, fmt):
    rows = chat_rows(30)
    write = write_jsonl if fmt == "jsonl" else write_parquet
    path = write(tmp_path / f"d.{fmt}", rows)

    def build(seed=0):
        return make_source("chat", path=path, seed=seed)

    a = build()
    stream = _stream(a, 11) + _stream(a, 80)  # crosses two epoch boundaries
    assert stream == _stream(build(), 91)
    b = build()
    b.next_batch(11)
    saved = json.loads(json.dumps(b.state()))
    c = build()
    c.restore(saved)
    assert _stream(c, 80) == stream[11:]
    assert _stream(build(seed=1), 91) != stream
    # the history and the system prompt are kept, in order
    two_turn = [p for p in build().eval_set() + build().next_batch(30) if len(p.prompt.turns) == 4]
    assert two_turn and [t.role for t in two_turn[0].prompt.turns] == [
        "system",
        "user",
        "assistant",
        "user",
    ]


def test_answers_optional_fields_mapped_and_eval_path(tmp_path):
    def mapped(rows):
        names = {"conversation": "messages", "question": "prompt", "solution": "answer"}
        return [{mine: r.get(theirs) for mine, theirs in names.items()} for r in rows]

    path = write_parquet(tmp_path / "mapped.parquet", mapped(chat_rows(40)))
    fields = {"messages": "conversation", "prompt": "question", "answer": "solution"}
    src = make_source("chat", path=path, fields=fields, eval_path=None)
    assert src.counts["prompt_only"] == 5 and src.counts["train"] + src.counts["eval"] == 40
    assert all(p.answer for p in src.eval_set())  # scored rows only
    assert len(src.eval_prompts()) >= len(src.eval_set())
    assert {p.answer for p in src.next_batch(40)} >= {""}  # prompt-only rows are trained on
    held = write_jsonl(tmp_path / "held.jsonl", mapped(chat_rows(6, seed=9)))
    src = make_source("chat", path=path, fields=fields, eval_path=held)
    assert src.counts == src.counts | {"train": 40, "eval": 6}
    assert len(src.eval_set()) == 6  # chat_rows(6): no eighth row, all answered
    with pytest.raises(
        SourceError, match=r"neither 'messages'.*its fields: conversation, solution"
    ):
        make_source("chat", path=path)  # unmapped: the row names its fields


def test_the_verifier_scores_chat_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))
    (p,) = make_source("chat", path=path).eval_set()[:1]
    assert score(p, f"...#{p.answer}") == 1.0 and score(p, "#-1") == 0.0
    (p,) = make_source("chat", path=path, verifier="math").eval_set()[:1]
    assert p.verifier == ("math",) and score(p, f"\\boxed{{{p.answer}}}") == 1.0
    prompt_only = [q for q in make_source("chat", path=path).next_batch(40) if not q.answer]
    with pytest.raises(VerifierError, match="no answer"):
        score(prompt_only[0], "#1")


# ----------------------------------------------------------------------------- bad input


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "1+1=", "answer": "2"})
    path.write_bytes((good + "\n" + '{"prompt": "caf\xe9 1+1="}\n').encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1\.jsonl:2: not UTF-8 \(byte 0xe9"):
        make_source("chat", path=path)


@pytest.mark.parametrize(
    "row, why",
    [
        ({"answer": "2"}, r"row has neither 'messages'.*nor a non-empty 'prompt'.*fields: answer"),
        ({"prompt": "  "}, "row has neither 'messages' .*nor a non-empty 'prompt'"),
        (
            {"messages": [_user("1+1="), {"role": "assistant", "content": "#2"}]},
            "the last turn is the 'assistant''s; a prompt must end with the user's turn",
        ),
        ({"messages": []}, "'messages' must be a non-empty list of turns"),
        ({"messages": [{"role": "user"}]}, r"turn 0 of 'messages' is not \{role: str, content"),
        ({"prompt": "1+1=", "answer": [2]}, "'answer' must be a string or a number"),
    ],
)
def test_bad_rows_name_the_file_and_row(tmp_path, row, why):
    rows = [{"prompt": "1+2=", "answer": "3"}] * 3 + [row]
    with pytest.raises(SourceError, match=r"bad\.jsonl:4: " + why):
        make_source("chat", path=write_jsonl(tmp_path / "bad.jsonl", rows))
    if isinstance(row.get("answer"), list):
        return  # a Parquet column holds one type
    with pytest.raises(SourceError, match=r"bad\.parquet row 3: " + why):
        make_source("chat", path=write_parquet(tmp_path / "bad.parquet", rows))


def test_empty_splits_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    good = write_jsonl(tmp_path / "good.jsonl", chat_rows(20))
    with pytest.raises(
        SourceError, match=r"task\.path: .*empty\.jsonl: no rows \(an empty split\)"
    ):
        make_source("chat", path=empty)
    with pytest.raises(SourceError, match=r"task\.eval_path: .*empty\.jsonl: no rows"):
        make_source("chat", path=good, eval_path=empty)
    with pytest.raises(SourceError, match=r"task\.path: .*nope\.parquet: no such file"):
        make_source("chat", path=tmp_path / "nope.parquet")
    with pytest.raises(SourceError, match=r"expected a \.jsonl or \.parquet"):
        make_source("chat", path=write_jsonl(tmp_path / "d.csv", ["a,b"]))
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    with pytest.raises(SourceError, match=r"DatasetDict folder with splits \['train', 'test'\]"):
        make_source("chat", path=tmp_path / "dd")
    with pytest.raises(SourceError, match="task.fields: unknown keys"):
        make_source("chat", path=good, fields={"conversation": "messages"})


def test_config_names_the_bad_key(tmp_path):
    from services.config import ConfigError, load_config

    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(20))
    base = ["task.source=chat", f'task.path="{path}"']
    assert load_config(None, [*base, "task.verifier=math"]).task.verifier == "math"
    with pytest.raises(ConfigError, match=r"task\.verifier: unknown verifier 'maths'; expected"):
        load_config(None, [*base, "task.verifier=maths"])
    with pytest.raises(ConfigError, match="task.verifier: .*needs task.verifier_pattern"):
        load_config(None, [*base, "task.verifier=regex"])
    with pytest.raises(ConfigError, match="task.fields: unknown keys"):
        load_config(None, [*base, 'task.fields={text = "q"}'])
    with pytest.raises(ConfigError, match="task.fields: expected a table of strings"):
        load_config(None, [*base, "task.fields={prompt = 3}"])
    with pytest.raises(ConfigError, match="task.chat_template_kwargs: only the chat source"):
        load_config(None, ["task.chat_template_kwargs={enable_thinking = false}"])
    cfg = load_config(None, [*base, "task.chat_template_kwargs={enable_thinking = false}"])
    assert cfg.task.chat_template_kwargs == {"enable_thinking": False}


# ----------------------------------------------------------------------------- rendering


def _tokenizer_dir(toy_pair, dest, template: str | None):
    """A copy of the toy pair's tokenizer files, with ``template`` as its chat template."""
    dest.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_pair.student_dir / name, dest / name)
    if template is not None:
        config = json.loads((dest / "tokenizer_config.json").read_text())
        (dest / "tokenizer_config.json").write_text(
            json.dumps(config | {"chat_template": template})
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(dest))


# Renders each turn as its content, separated by ';' (the toy vocabulary has no letters).
TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }};{% endfor %}"
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('system turns are not supported') }}{% endif %}{% endfor %}" + TEMPLATE
)


def test_single_turn_chat_renders_as_the_plain_prompt(toy_pair):
    from transformers import AutoTokenizer

    from rollout.prompting import encode_prompt

    tok = AutoTokenizer.from_pretrained(str(toy_pair.student_dir))
    assert encode_prompt(tok, Chat.of([("user", "12+3=")])) == encode_prompt(tok, "12+3=")
    ids = encode_prompt(tok, Chat.of([("system", "1"), ("user", "2+2=")]))
    text = "system: 1\n2+2="  # the plain fallback: earlier turns as "role: content" lines
    assert ids == [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
    assert len(ids) == 1 + len(text) and tok.decode(ids[-4:]) == "2+2="


def test_the_check_refuses_a_teacher_whose_template_differs(toy_pair, tmp_path):
    student = _tokenizer_dir(toy_pair, tmp_path / "student", TEMPLATE)
    same = _tokenizer_dir(toy_pair, tmp_path / "same", TEMPLATE)
    other = _tokenizer_dir(toy_pair, tmp_path / "other", TEMPLATE.replace(";", "="))
    plain = _tokenizer_dir(toy_pair, tmp_path / "plain", None)
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))
    samples = [(p.id, p.prompt) for p in sample_problems(make_source("chat", path=path))]
    assert check_same_rendering(samples, same, student) == len(samples) >= 4
    with pytest.raises(RenderingMismatch) as err:
        check_same_rendering(samples, other, student)
    message = str(err.value)
    assert f"{samples[0][0]}: the teacher and the student render this prompt differently" in message
    # <bos>, the system turn "Add." (four tokens), then the separator: '=' against ';'
    assert "from token 5 on" in message
    teacher_line, student_line = message.splitlines()[1:3]
    assert teacher_line.startswith("  teacher: …'<bos>") and "⟦'=" in teacher_line
    assert student_line.startswith("  student: …'<bos>") and "⟦';" in student_line
    with pytest.raises(RenderingMismatch):
        check_same_rendering(samples, plain, student)  # one has a template, the other not


def test_a_role_the_template_rejects_names_the_row(toy_pair, tmp_path):
    strict = _tokenizer_dir(toy_pair, tmp_path / "strict", NO_SYSTEM)
    path = write_jsonl(tmp_path / "d.jsonl", chat_rows(40))
    samples = [(p.id, p.prompt) for p in sample_problems(make_source("chat", path=path))]
    with pytest.raises(PromptError, match=r"chat:d:\d+: teacher: .*rejects a chat with roles "):
        check_same_rendering(samples, strict, strict)
    plain = _tokenizer_dir(toy_pair, tmp_path / "plain", None)
    tool = Chat.of([("tool", "1"), ("user", "1+1=")])
    with pytest.raises(PromptError, match="takes roles system, user, assistant; got 'tool'"):
        check_same_rendering([("row 7", tool)], plain, plain)


# ----------------------------------------------------------------------------- a run


@pytest.mark.slow
def test_in_process_run_on_a_parquet_chat_dataset(ray_local, toy_pair, tmp_path):
    """Two steps of OPD+ on system prompts and two-turn histories; the ledger replays the chat
    source (check_ledger) and every sample id is a row of the file."""
    from run_helpers import small_config, step_rows

    from services.driver import train
    from services.ledger import check_ledger
    from services.parts import build_source

    rows = [dict(r, id=f"row{i}") for i, r in enumerate(chat_rows(48))]
    path = write_parquet(tmp_path / "chats.parquet", rows, row_group_size=16)
    cfg = small_config(
        toy_pair,
        tmp_path,
        "chat",
        2,
        **{
            "rollout.in_process": "true",
            "task.source": "chat",
            "task.path": f'"{path}"',
            "task.verifier": "marker",
        },
    )
    summary = train(cfg, progress=False)
    run_dir = tmp_path / "chat"
    assert [r["step"] for r in step_rows(run_dir)] == [1, 2]
    assert summary.eval_after["n_problems"] == len(build_source(cfg).eval_set()[:4]) > 0
    report = check_ledger(run_dir)
    assert report.ok and report.samples == 2 * 4 * 2, report.problems
    ledger = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    ids = {s.rsplit("/", 1)[0] for r in ledger for s in r["sample_ids"]}
    assert ids <= {f"chat:row{i}" for i in range(48)}


@pytest.mark.slow
def test_a_run_with_a_differently_templated_teacher_stops_before_any_engine(
    ray_local, toy_pair, tmp_path
):
    """The driver checks the rendering before the learner or the rollout tier starts: the run
    stops with the mismatch (no metrics, no ledger) on a teacher whose chat template differs."""
    from run_helpers import small_config

    from services.driver import train

    teacher = tmp_path / "teacher"
    shutil.copytree(toy_pair.teacher_dir, teacher)
    config = json.loads((teacher / "tokenizer_config.json").read_text())
    (teacher / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": TEMPLATE}))
    path = write_parquet(tmp_path / "chats.parquet", chat_rows(40))
    cfg = small_config(
        toy_pair,
        tmp_path,
        "mismatch",
        2,
        **{
            "rollout.in_process": "true",
            "models.teacher": f'"{teacher}"',
            "task.source": "chat",
            "task.path": f'"{path}"',
        },
    )
    with pytest.raises(RenderingMismatch, match="render this prompt differently"):
        train(cfg, progress=False)
    run_dir = tmp_path / "mismatch"
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "samples.jsonl").exists()
