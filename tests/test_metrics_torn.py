"""A run that crashed mid-write leaves a half-written last row in metrics.jsonl or
samples.jsonl: resuming, read_metrics and the ledger drop it with a warning (no traceback),
nothing else is lost (the dropped text moves to ``*.discarded.jsonl``); a broken row before
the last is corruption and a clear error naming the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.ledger import LedgerError, read_ledger
from services.metrics import MetricsLogger, TornFileError, read_metrics

ROWS = [{"step": s, "learner/loss": 1.0 / (s + 1)} for s in range(4)]
TORN = '{"step": 4, "learner/lo'  # the crash hit mid-row: no closing brace, no newline


def _write(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_read_metrics_drops_a_torn_last_row_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    _write(path, ROWS, TORN)
    assert read_metrics(path) == ROWS
    out = capsys.readouterr().out
    assert f"{path}:5: dropped a half-written last row" in out
    # A complete last row without its newline is a row, not a torn one.
    _write(path, ROWS[:3], json.dumps(ROWS[3]))
    assert read_metrics(path) == ROWS
    assert "dropped" not in capsys.readouterr().out


def test_a_broken_row_before_the_last_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, ROWS[:2], TORN + "\n" + json.dumps(ROWS[2]) + "\n")
    with pytest.raises(TornFileError, match=f"{path}:3: not a JSON row"):
        read_metrics(path)


def test_resume_drops_the_torn_row_and_keeps_it_aside(tmp_path, capsys):
    """--resume after a crash that tore the last rows of both files: the logger opens, keeps
    the rows up to the checkpoint, moves the rest (the torn text too) aside, and appends."""
    _write(tmp_path / "metrics.jsonl", ROWS, TORN)
    ledger = [{"step": s, "sample_ids": [f"p{s}/0"]} for s in range(1, 4)]
    _write(tmp_path / "samples.jsonl", ledger, '{"step": 4, "sample_i')
    logger = MetricsLogger(tmp_path, tensorboard=False, ray_metrics=False, resume_from_step=2)
    logger.log(3, {"learner/loss": 0.3}, ledger={"step": 3, "sample_ids": ["q3/0"]})
    logger.close()
    assert "dropped a half-written last row" in capsys.readouterr().out
    assert read_metrics(tmp_path / "metrics.jsonl") == [*ROWS[:3], {"step": 3, "learner/loss": 0.3}]
    discarded = (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()
    assert discarded == [json.dumps(ROWS[3]), TORN]
    assert read_ledger(tmp_path) == [*ledger[:2], {"step": 3, "sample_ids": ["q3/0"]}]
    assert (tmp_path / "samples.discarded.jsonl").read_text().splitlines()[-1] == (
        '{"step": 4, "sample_i'
    )


def test_the_ledger_reader_drops_a_torn_row_and_names_a_broken_one(tmp_path, capsys):
    rows = [{"step": s, "sample_ids": [f"p{s}/0"]} for s in range(1, 3)]
    _write(tmp_path / "samples.jsonl", rows, '{"step": 3, "sam')
    assert read_ledger(tmp_path) == rows
    assert "samples.jsonl:3: dropped" in capsys.readouterr().out
    _write(tmp_path / "samples.jsonl", rows[:1], "garbage\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(LedgerError, match="samples.jsonl:2: not a JSON row"):
        read_ledger(tmp_path)
