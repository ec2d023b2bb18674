"""A run whose samples are episodes (issue 22): the toy pair through real vLLM samplers and
scorers (in-process) and the DeepSpeed learner, the student calling the test tool of
``test_episodes_sampler`` (``+ARG=`` answered with a seeded number). The ledger is clean, every
step's batch holds tool calls, and the learner counted the student's tokens only."""

from __future__ import annotations

import pytest
from run_helpers import rows, small_config, step_rows
from test_episodes_sampler import PLUS

pytestmark = pytest.mark.slow


def test_a_tool_episode_run_trains_on_student_tokens_with_a_clean_ledger(
    ray_local, toy_pair, tmp_path
):
    from services.driver import train
    from services.ledger import check_ledger

    cfg = small_config(
        toy_pair,
        tmp_path,
        "episodes",
        2,
        **{
            "rollout.in_process": "true",
            "task.environment": f'"{PLUS}"',
            "rollout.max_turns": 3,
            "rollout.max_episode_tokens": 32,
            "rollout.max_model_len": 48,
            "distill.teacher_topk": 4,  # the dense path: top-K at every trajectory position
        },
    )
    summary = train(cfg, progress=False)
    # Held-out evaluation ran episodes too and reports how often the student called the tool.
    assert 0 <= summary.eval_after["greedy_tool_call_rate"] <= 1
    run_dir = tmp_path / "episodes"
    got = step_rows(run_dir)
    assert [r["step"] for r in got] == [1, 2]
    for r in got:
        assert r["episode/tool_calls_mean"] > 0 and r["episode/environment_tokens"] > 0
        # The learner's token count is the student's: the environment's tokens are not trained.
        assert r["learner/tokens"] == r["episode/student_tokens"]
        total = r["rollout/response_len_mean"] * 8
        assert r["episode/student_tokens"] + r["episode/environment_tokens"] == total
    report = check_ledger(run_dir)
    assert report.ok, report.problems
    assert all(len(set(r["response_crc"])) > 1 for r in rows(run_dir, "samples.jsonl"))
