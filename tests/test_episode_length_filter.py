"""The prompt-length filter of a run with an environment (services/driver.py::run_source): a
prompt counts as an episode starts from (task.environment_system's message, then the problem:
``EpisodeSettings.prompt``) and keeps room for a whole episode (rollout.max_episode_tokens)
inside rollout.max_model_len, so a long system message never silently shortens episodes.
No engine: the toy tool pair's tokenizer and its problem files."""

from __future__ import annotations

import pytest

SYSTEM = "Call <calc>A*B</calc> for every product; then write #ANSWER. " * 2


def _config(pair, **sets):
    from services.config import load_config

    overrides = {
        "task.path": f'"{pair.train_path}"',
        "task.eval_path": f'"{pair.heldout_path}"',
        "task.environment_system": f'"{SYSTEM}"',
        **sets,
    }
    return load_config("deploy/configs/toy_tool.toml", [f"{k}={v}" for k, v in overrides.items()])


def _episode_prompt_lengths(cfg, problems, tokenizer) -> set[int]:
    from rollout.prompting import encode_prompt
    from services.parts import episode_settings

    episodes = episode_settings(cfg)
    return {len(encode_prompt(tokenizer, episodes.prompt(p))) for p in problems}


def test_the_filter_keeps_room_for_the_system_message_and_the_whole_episode(toy_tool_pair):
    from services.driver import run_source
    from services.parts import build_source, load_tokenizer

    cfg = _config(toy_tool_pair)
    tokenizer = load_tokenizer(toy_tool_pair.student_dir)
    heldout = build_source(cfg).eval_set()
    lengths = _episode_prompt_lengths(cfg, heldout, tokenizer)
    longest = max(lengths)
    raw = max(len(tokenizer(p.prompt)["input_ids"]) for p in heldout)
    assert longest > raw + 20  # the system message is most of the episode's prompt
    met = cfg.rollout.max_episode_tokens

    # Room for the longest episode prompt, the whole episode and the scorer's one position.
    fits = _config(toy_tool_pair, **{"rollout.max_model_len": longest + met + 1})
    limited = run_source(fits, build_source(fits), tokenizer)
    assert len(limited.eval_set()) == len(heldout) and limited.eval_skipped_tokens == 0
    for p in limited.next_batch(16):
        (n,) = _episode_prompt_lengths(fits, [p], tokenizer)
        assert n + met + 1 <= fits.rollout.max_model_len  # no episode shortened by the context

    # One token less: every prompt of that longest length would shorten its episode: left out.
    tight = _config(toy_tool_pair, **{"rollout.max_model_len": longest + met})
    limited = run_source(tight, build_source(tight), tokenizer)
    kept = limited.eval_set()
    assert limited.eval_skipped_tokens == sum(
        _episode_prompt_lengths(tight, [p], tokenizer) == {longest} for p in heldout
    )
    assert limited.eval_skipped_tokens > 0
    assert max(_episode_prompt_lengths(tight, kept, tokenizer), default=0) < longest


def test_no_room_for_a_prompt_beside_the_episode_budget_names_the_keys(toy_tool_pair):
    from services.config import ConfigError
    from services.driver import run_source
    from services.parts import build_source, load_tokenizer

    cfg = _config(toy_tool_pair, **{"rollout.max_model_len": 64, "rollout.max_episode_tokens": 63})
    with pytest.raises(ConfigError) as err:
        run_source(cfg, build_source(cfg), load_tokenizer(toy_tool_pair.student_dir))
    assert "rollout.max_episode_tokens (63)" in str(err.value)
    assert "rollout.max_model_len (64)" in str(err.value)
