"""Several teachers for one student ([[teachers]], services/teachers.py): each prompt scored by
the teacher its data row names, one batch mixing them, the ledger naming each sample's teacher,
per-teacher metrics; and the errors before any engine starts (a name the data uses but the
config lacks, two teachers with one name, a teacher whose tokenizer differs)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rollout import tasks
from rollout.records import TeacherScore

# ------------------------------------------------------------------------------- helpers


def write_rows(path: Path, n: int, owners: tuple[str, ...], seed: int = 0) -> Path:
    """A JSONL file of ``n`` arithmetic problems (the toy task's prompts and answers); row i
    names teacher ``owners[i % len(owners)]`` ("" = no teacher field: the first teacher)."""
    gen = tasks.ArithmeticGenerator(seed)
    with path.open("w") as f:
        for i in range(n):
            p = gen.next()
            row = {"id": f"r{i}", "prompt": p.prompt, "answer": p.answer}
            if owners[i % len(owners)]:
                row["teacher"] = owners[i % len(owners)]
            f.write(json.dumps(row) + "\n")
    return path


class ConstTeacherEngine:
    """Scores every response token ``logp`` (a teacher the test can tell apart by it)."""

    def __init__(self, logp: float) -> None:
        self.logp = logp

    def score(self, prompt_ids, response_ids):
        return [TeacherScore(tuple(self.logp for _ in r)) for r in response_ids]

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class ConstSpec:
    """An engine spec (tests/fake_engines.py's student; a teacher scoring ``logp``)."""

    logp: float
    length: int = 4
    built: list = field(default_factory=list, compare=False)

    def student_engine(self):
        from fake_engines import FakeStudentEngine

        return FakeStudentEngine(self.length)  # every sampled token's log-prob is -1.0

    def teacher_engine(self):
        return ConstTeacherEngine(self.logp)


def _service(teachers, prompts=8, n=2):
    from services.rollout_service import RolloutPlan, RolloutService
    from services.teachers import TeacherSpec

    plan = RolloutPlan(
        prompts_per_step=prompts,
        samples_per_prompt=n,
        max_tokens=8,
        temperature=1.0,
        max_staleness=0,
        channel_capacity=64,
        sync_timeout_s=30,
        seed=3,
    )
    specs = [TeacherSpec(name, ConstSpec(logp), k, {}) for name, logp, k in teachers]
    return RolloutService(
        student_settings=ConstSpec(0.0),
        teacher_settings=None,
        num_samplers=1,
        num_scorers=0,
        sampler_resources={},
        scorer_resources={},
        plan=plan,
        in_process=True,
        teachers=specs,
    )


# ------------------------------------------------------------------------- routing (pure)


def test_routes_lay_scorer_slots_out_teacher_by_teacher_and_route_by_the_row():
    from services.teachers import Routes, UnknownTeacher

    routes = Routes([("big", 1), ("small", 2)])
    assert [routes.slot_teacher(s) for s in range(3)] == ["big", "small", "small"]
    assert routes.slot_teacher(3) == "big"  # a slot past the layout cycles through it

    @dataclass(frozen=True)
    class P:
        id: str
        teacher: str = ""
        source: str = "jsonl:x"

    routes.note([P("a"), P("b", "small"), P("c", "big")])
    assert [routes.teacher_of(i) for i in "abcz"] == ["big", "small", "big", "big"]
    with pytest.raises(
        UnknownTeacher, match=r"d \(jsonl:x\): names teacher 'huge'.*'big', 'small'"
    ):
        routes.note([P("d", "huge")])


# ------------------------------------------------------- the rollout tier over test engines


def test_one_batch_mixes_teachers_each_prompt_scored_by_its_own(tmp_path):
    """Rows naming "small" go to small's scorers (slots 1 and 2), the others to big's (slot
    0); each sample carries its teacher's scores and name; the per-teacher metrics and the
    ledger row follow; scorers of several teachers cannot be resized."""
    from rollout.sources import make_source
    from services.channel import RolloutError
    from services.ledger import ledger_row
    from services.parts import teacher_metrics

    data = write_rows(tmp_path / "rows.jsonl", 40, ("", "small"))
    source = make_source("jsonl", path=data, seed=1)
    owner = {f"jsonl:r{i}": ("big", "small")[i % 2] for i in range(40)}
    svc = _service([("big", -0.5, 1), ("small", -2.0, 2)])
    svc.start(source, lambda text: [ord(c) % 50 for c in text], first_step=1, last_step=2)
    try:
        batch = svc.next_batch(1, timeout=30)
        teachers = [p.teacher for p in batch.provenance]
        assert set(teachers) == {"big", "small"}  # one batch, both teachers
        for s, p in zip(batch.samples, batch.provenance, strict=True):
            assert p.teacher == owner[s.rollout.problem_id]
            assert set(s.logp_teacher) == {-0.5 if p.teacher == "big" else -2.0}
            want = (
                {"teacher-scorer-0"}
                if p.teacher == "big"
                else {"teacher-scorer-1", "teacher-scorer-2"}
            )
            assert p.scorer in want
        metrics = teacher_metrics(batch)
        assert metrics["teacher/big/reverse_kl"] == pytest.approx(-1.0 + 0.5)  # logp_s = -1
        assert metrics["teacher/small/reverse_kl"] == pytest.approx(-1.0 + 2.0)
        assert metrics["teacher/big/samples"] + metrics["teacher/small/samples"] == len(batch)
        assert ledger_row(batch)["teachers"] == teachers
        with pytest.raises(RolloutError, match="set per teacher"):
            svc.scale(scorers=1)
        svc.push_weights([("w", 1)], version=1, wait=True)  # staleness 0: step 2 needs it
        assert len(svc.next_batch(2, timeout=30)) == 16
    finally:
        svc.stop()


def test_a_teacher_the_data_names_but_the_config_lacks_stops_the_producer(tmp_path):
    from rollout.sources import make_source
    from services.channel import RolloutError

    data = write_rows(tmp_path / "rows.jsonl", 20, ("", "huge"))
    svc = _service([("big", -0.5, 1), ("small", -2.0, 1)])
    svc.start(make_source("jsonl", path=data, seed=1), lambda t: [1, 2], first_step=1, last_step=1)
    try:
        with pytest.raises(RolloutError, match="names teacher 'huge'"):
            svc.next_batch(1, timeout=30)
    finally:
        svc.stop()


def test_one_implicit_teacher_keeps_todays_batch_and_ledger():
    """No [[teachers]]: no teacher in the provenance, no teachers column, no per-teacher keys."""
    from fake_engines import FakeSpec

    from rollout.sources import make_source
    from services.ledger import ledger_row
    from services.parts import teacher_metrics
    from services.rollout_service import RolloutPlan, RolloutService

    plan = RolloutPlan(4, 2, 8, 1.0, 0, 64, 30, 3)
    spec = FakeSpec()
    svc = RolloutService(
        student_settings=spec, teacher_settings=spec, num_samplers=1, num_scorers=1,
        sampler_resources={}, scorer_resources={}, plan=plan, in_process=True,
    )  # fmt: skip
    svc.start(make_source("arithmetic", seed=5), lambda t: [1, 2], first_step=1, last_step=1)
    try:
        batch = svc.next_batch(1, timeout=30)
        assert {p.teacher for p in batch.provenance} == {""}
        assert "teachers" not in ledger_row(batch) and teacher_metrics(batch) == {}
    finally:
        svc.stop()


# ------------------------------------------------------------------ errors before engines


def _cfg(*sets: str):
    from services.config import load_config

    return load_config(None, ["ray.num_cpus=0", *sets])


TWO = 'teachers=[{name="big", model="/m/big"}, {name="small", model="/m/small"}]'


def test_config_errors_name_the_entry():
    from services.config import ConfigError, teacher_entries

    cfg = _cfg(TWO, "rollout.scorer_cpus=0.25", "models.dtype=bfloat16")
    big, small = teacher_entries(cfg)
    assert (big.name, big.model, big.scorer_cpus, big.dtype) == ("big", "/m/big", 0.25, "bfloat16")
    assert [t.name for t in teacher_entries(_cfg())] == ["teacher"]  # models.teacher, implicit
    cases = {
        'teachers=[{name="a", model="x"}, {name="a", model="y"}]': (
            "teachers[1].name: 'a' is also the name of teachers[0]"
        ),
        'teachers=[{name="a", model="x"}, {name="", model="y"}]': "teachers[1].name: must be",
        'teachers=[{name="a", modle="x"}]': "teachers[0].modle: unknown key; did you mean 'model'",
        'teachers=[{name="a"}]': "teachers[0].model: must name a model folder",
        'teachers=[{name="a", model="x", dtype="fp8"}]': "teachers[0].dtype",
        'teachers=[{name="a", model="x", num_scorers=0}]': "teachers[0].num_scorers: must be >= 1",
        "teachers=3": "teachers: expected [[teachers]] tables",
    }
    for bad, message in cases.items():
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            _cfg(bad)
    with pytest.raises(ConfigError, match="distill.teacher_topk: 'full' applies one teacher"):
        _cfg(TWO, 'distill.teacher_topk="full"')


def test_the_config_round_trips_through_its_stored_toml(tmp_path):
    from services.config import load_config, to_toml

    cfg = _cfg(TWO, "run.seed=1")
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_a_teacher_the_data_names_but_the_config_lacks_is_an_error_naming_the_row(tmp_path):
    from rollout.sources import make_source
    from services.config import ConfigError
    from services.teachers import check_data

    data = write_rows(tmp_path / "rows.jsonl", 10, ("", "small", "tiny"))
    check_data(make_source("jsonl", path=data), ["big", "small", "tiny"])
    with pytest.raises(ConfigError, match=r"jsonl:r\d+ \(jsonl:rows\): names teacher 'tiny'"):
        check_data(make_source("jsonl", path=data), ["big", "small"])
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "who": w}) + "\n"
            for i, w in enumerate(["big"] * 12 + ["other"])
        )
    )
    source = make_source("chat", path=chat, fields={"teacher": "who"})
    with pytest.raises(ConfigError, match=r"chat.jsonl row 12: names teacher 'other'"):
        check_data(source, ["big"])


def test_every_teachers_tokenizer_is_checked_naming_the_entry_and_both_folders(toy_pair, tmp_path):
    from models.checks import ModelPairError
    from services.parts import teacher_dirs

    student, teacher = Path(toy_pair.student_dir), Path(toy_pair.teacher_dir)
    swapped = tmp_path / "swapped"  # the config and tokenizer only: the check reads no weights
    shutil.copytree(teacher, swapped, ignore=shutil.ignore_patterns("eval-*.json"))
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))

    def cfg(second: Path):
        return _cfg(
            f'models.student="{student}"',
            f'teachers=[{{name="big", model="{teacher}"}}, {{name="odd", model="{second}"}}]',
        )

    assert teacher_dirs(cfg(student), None) == {"big": teacher, "odd": student}
    with pytest.raises(ModelPairError) as err:
        teacher_dirs(cfg(swapped), None)
    text = str(err.value)
    assert text.startswith("teachers[1] ('odd'): student (") and str(student) in text
    assert f"teacher ({swapped})" in text and "tokenizers differ" in text


def test_the_ledger_checker_names_a_sample_scored_by_the_wrong_teacher(tmp_path):
    """A clean two-teacher ledger checks ok; one sample given the other teacher, an unknown
    teacher, or a row without the teachers column is each named (ledger_fixtures' layout)."""
    from ledger_fixtures import clean_rows, dealt_batches, write_run_dir

    from services.config import load_config
    from services.ledger import check_ledger

    data = write_rows(tmp_path / "rows.jsonl", 30, ("", "small"))
    cfg = load_config(
        None,
        [
            'run.name="led"', f'run.out_dir="{tmp_path}"', "run.steps=3",
            'task.source="jsonl"', f'task.path="{data}"', "rollout.prompts_per_step=2",
            "rollout.samples_per_prompt=2", "rollout.max_staleness=1", TWO,
        ],
    )  # fmt: skip
    owner = {f"jsonl:r{i}": ("big", "small")[i % 2] for i in range(30)}
    rows = clean_rows(cfg)
    for row, ids in zip(rows, dealt_batches(cfg), strict=True):
        row["teachers"] = [owner[sid.rsplit("/", 1)[0]] for sid in ids]
    assert check_ledger(write_run_dir(tmp_path / "led", cfg, rows)).ok
    assert set(check_ledger(tmp_path / "led").per_teacher) <= {"big", "small"}

    def planted(edit) -> list[str]:
        changed = json.loads(json.dumps(rows))
        edit(changed)
        return check_ledger(write_run_dir(tmp_path / "led", cfg, changed)).problems

    def swap(r):
        r[1]["teachers"][0] = {"big": "small", "small": "big"}[r[1]["teachers"][0]]

    assert [p.split(":")[0] for p in planted(swap)] == ["step 2"]
    assert "scored by the wrong teacher" in planted(swap)[0]
    assert any(
        "not among the config's" in p
        for p in planted(lambda r: r[0]["teachers"].__setitem__(0, "x"))
    )
    assert planted(lambda r: r[2].pop("teachers")) == [
        "step 3: no teachers column, but the config has [[teachers]]"
    ]


# ----------------------------------------------------------------- a real run, in process


@pytest.mark.slow
@pytest.mark.long  # 53 s here (two scorers' engines, a sampler, the learner, 4 evaluations)
def test_a_student_learns_from_two_teachers_in_one_run(ray_local, toy_pair, tmp_path):
    """The toy teacher ("toy") and the toy student itself ("self", a teacher it already
    agrees with) each own half of the prompts: every step's batch mixes them, the ledger names
    each sample's teacher and checks clean, and the per-teacher divergence differs (the
    student is its own teacher: its sampled reverse KL to "self" is ~0 at the start)."""
    from run_helpers import rows, small_config, step_rows

    from services.driver import train
    from services.ledger import check_ledger

    data = write_rows(tmp_path / "rows.jsonl", 200, ("", "self"))
    entries = (
        f'[{{name="toy", model="{toy_pair.teacher_dir}", scorer_cpus=0.2}}, '
        f'{{name="self", model="{toy_pair.student_dir}", scorer_cpus=0.2}}]'
    )
    cfg = small_config(
        toy_pair,
        tmp_path,
        "two",
        2,
        **{
            "rollout.in_process": "true",
            "rollout.max_staleness": 0,
            "task.source": '"jsonl"',
            "task.path": f'"{data}"',
            "teachers": entries,
        },
    )
    summary = train(cfg, progress=False)
    run_dir = tmp_path / "two"
    ledger = rows(run_dir, "samples.jsonl")
    assert all(set(r["teachers"]) == {"toy", "self"} for r in ledger)  # each batch mixes both
    report = check_ledger(run_dir)
    assert report.ok, report.problems
    assert set(report.per_teacher) == {"toy", "self"}
    first = step_rows(run_dir)[0]
    assert first["teacher/toy/reverse_kl"] > first["teacher/self/reverse_kl"] + 0.1
    assert abs(first["teacher/self/reverse_kl"]) < 0.05
    evals = [r for r in rows(run_dir) if "eval/teacher/toy/greedy_acc" in r]
    assert len(evals) == 2 and all("eval/teacher/self/greedy_acc" in r for r in evals)
    assert set(summary.teachers) == {"toy", "self"}
