"""The ledger checker (services/ledger.py::check_ledger) on a synthetic run directory: a clean
ledger passes, and each kind of violation planted in it is reported by name.

No engine starts: the run directory is a resolved config.toml plus the samples.jsonl a correct
run writes (tests/ledger_fixtures.py deals the batches from a fresh prompt source).
"""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
from ledger_fixtures import (
    MAX_STALENESS,
    PROMPTS_PER_STEP,
    SAMPLES_PER_PROMPT,
    STEPS,
    clean_rows,
    ledger_config,
    write_run_dir,
)

from services.cli import main
from services.ledger import check_ledger

BATCH = PROMPTS_PER_STEP * SAMPLES_PER_PROMPT


@pytest.fixture(scope="module")
def cfg():
    return ledger_config()


@pytest.fixture(scope="module")
def rows(cfg):
    out = clean_rows(cfg)
    ids = [i for r in out for i in r["sample_ids"]]
    # The plants below rely on every id being dealt once in these steps.
    assert len(ids) == len(set(ids)) == STEPS * BATCH
    return out


def _check(tmp_path, cfg, rows):
    return check_ledger(write_run_dir(tmp_path / "run", cfg, rows))


def test_clean_ledger_is_ok_and_counted(tmp_path, cfg, rows):
    report = _check(tmp_path, cfg, rows)
    assert report.ok, report.problems
    assert report.steps == STEPS and report.samples == STEPS * BATCH
    assert report.retried_samples == 1  # step 2's first sample has attempts = 2
    assert report.per_sampler == dict(Counter(s for r in rows for s in r["samplers"]))
    assert report.per_scorer == {"teacher-scorer-0": STEPS * BATCH}
    # The clean ledger already holds samples exactly max_staleness old: the bound is tight.
    lags = {r["step"] - 1 - v for r in rows for v in r["versions"]}
    assert lags == {0, MAX_STALENESS}


def _drop_step(rows):
    del rows[1]  # steps 1, 3


def _repeat_step(rows):
    rows.insert(2, copy.deepcopy(rows[1]))  # steps 1, 2, 2, 3


def _reuse_id_of_other_step(rows):
    rows[1]["sample_ids"][0] = rows[0]["sample_ids"][0]


def _id_twice_in_one_step(rows):
    rows[1]["sample_ids"][1] = rows[1]["sample_ids"][0]  # still BATCH entries long


def _foreign_id(rows):
    rows[2]["sample_ids"][-1] = "arith:never-dealt/0"


def _one_past_staleness(rows):
    rows[2]["versions"][0] = 2 - 1 - MAX_STALENESS  # step 3 trains at version 2: lag 2


def _future_version(rows):
    rows[1]["versions"][0] = 2  # step 2 trains at version 1: sampled by a policy not yet made


def _short_column(rows):
    rows[1]["samplers"].pop()


def _too_few_samples(rows):
    for value in rows[2].values():
        if isinstance(value, list):
            value.pop()


PLANTS = {
    "missing_step": (_drop_step, "steps are [1, 3], expected 1..2"),
    "duplicated_step": (_repeat_step, "steps are [1, 2, 2, 3], expected 1..4"),
    "sample_id_of_another_step": (_reuse_id_of_other_step, "appear more often than dealt"),
    "id_twice_in_one_step": (_id_twice_in_one_step, "appear more often than dealt"),
    "foreign_id": (_foreign_id, "unexpected ['arith:never-dealt/0']"),
    "one_past_staleness": (_one_past_staleness, f"staleness 2 > {MAX_STALENESS}"),
    "version_from_the_future": (_future_version, "a sample of version 2, newer than the learner"),
    "short_column": (_short_column, f"column samplers has {BATCH - 1} entries for {BATCH}"),
    "too_few_samples": (_too_few_samples, f"step 3: {BATCH - 1} samples, expected {BATCH}"),
}


@pytest.mark.parametrize("plant", PLANTS, ids=str)
def test_planted_violation_is_reported(tmp_path, cfg, rows, plant):
    edit, expected = PLANTS[plant]
    broken = copy.deepcopy(rows)
    edit(broken)
    report = _check(tmp_path, cfg, broken)
    assert not report.ok
    assert any(expected in p for p in report.problems), report.problems


def test_reused_id_is_named(tmp_path, cfg, rows):
    broken = copy.deepcopy(rows)
    _reuse_id_of_other_step(broken)
    report = _check(tmp_path, cfg, broken)
    reused = rows[0]["sample_ids"][0]
    assert any("more often than dealt" in p and reused in p for p in report.problems)
    # Step 2 also lost one of its own samples to the reused id.
    assert any(
        p.startswith(f"step 2: not its batch (missing ['{rows[1]['sample_ids'][0]}']")
        for p in report.problems
    ), report.problems


def test_ledger_cli_exit_code_and_json(tmp_path, cfg, rows, capsys):
    clean = write_run_dir(tmp_path / "clean", cfg, rows)
    assert main(["ledger", str(clean)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["problems"] == []
    assert out["steps"] == STEPS and out["samples"] == STEPS * BATCH

    broken_rows = copy.deepcopy(rows)
    _short_column(broken_rows)
    broken = write_run_dir(tmp_path / "broken", cfg, broken_rows)
    assert main(["ledger", str(broken)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False
    assert any("column samplers" in p for p in out["problems"])


def test_a_problem_the_source_dealt_twice_in_one_step_is_clean(tmp_path):
    """128 arithmetic prompts a step (the demo's layout) often hold one problem twice: both
    deals train, under the same sample ids. The checker compares multisets, so the clean run
    passes — and one more copy than dealt still fails."""
    cfg = ledger_config()
    from services.config import load_config

    wide = load_config(None, [*_sets(cfg), "rollout.prompts_per_step=128", "run.steps=10"])
    rows = clean_rows(wide, steps=10)
    row = next(r for r in rows if len(set(r["sample_ids"])) < len(r["sample_ids"]))
    counts = Counter(row["sample_ids"])
    twice = [sid for sid, n in counts.items() if n > 1]
    assert check_ledger(write_run_dir(tmp_path / "ok", wide, rows)).ok

    broken = copy.deepcopy(rows)
    bad_row = broken[rows.index(row)]
    once = next(sid for sid, n in counts.items() if n == 1)
    bad_row["sample_ids"][bad_row["sample_ids"].index(once)] = twice[0]  # one copy too many
    report = check_ledger(write_run_dir(tmp_path / "bad", wide, broken))
    assert any("appear more often than dealt" in p and twice[0] in p for p in report.problems)


def _sets(cfg) -> list[str]:
    r = cfg.rollout
    return [
        f'run.name="{cfg.run.name}"',
        f'run.out_dir="{cfg.run.out_dir}"',
        'task.source="arithmetic"',
        f"rollout.samples_per_prompt={r.samples_per_prompt}",
        f"rollout.max_staleness={r.max_staleness}",
    ]
