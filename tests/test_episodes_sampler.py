"""The sampler's episode loop on a real vLLM engine (issue 22, rollout/episodes.py).

The toy student writes ``a+b+c=..`` column sums; an environment defined here calls a tool with
``+ARG=`` (markers in the toy vocabulary, so the student really makes calls), the tool answers
a number drawn from its seed, and the answer is appended as ``[NUMBER]`` (the plain rendering;
the toy vocabulary maps the brackets to <unk>, which is still a token the model reads).
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from rollout.environments import (
    ENVIRONMENTS,
    EnvironmentKind,
    EnvironmentOptions,
    ToolEnvironment,
    episode_prompt,
    episode_seed,
    make_environment,
    register_environment,
)
from rollout.episodes import EpisodeSettings, mix_seed
from rollout.prompting import TOOL_ANSWER_CLOSE, TOOL_ANSWER_OPEN, encode_prompt
from rollout.records import Episode
from rollout.sampler import Sampler, SampleRequest, WorkItem
from rollout.sources import Problem
from rollout.tools import ToolResult

pytestmark = [pytest.mark.slow, pytest.mark.long]  # ~16 s: an engine of its own


def seeded_tool(argument: str, seed: int) -> ToolResult:
    """A number from the call's seed (so a replay must give the same one), or an error for an
    empty argument."""
    if not argument:
        return ToolResult("error: empty", True)
    return ToolResult(str(random.Random(seed).randrange(1000)), False)


def _register(name: str, open: str, close: str) -> str:
    if name not in ENVIRONMENTS:
        register_environment(
            EnvironmentKind(
                name=name,
                doc="test: a seeded number for +ARG=",
                build=lambda o: ToolEnvironment(
                    name, open=open, close=close, tool=seeded_tool, options=o
                ),
            )
        )
    return name


PLUS = _register("test_plus", "+", "=")  # every column sum is a call
NEVER = _register("test_never", "+", "#?")  # opened, never closed: cut at the budget


def problems(n: int) -> list[Problem]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
        out.append(Problem(f"q{i}", f"{a}+{b}=", str(a + b), "test", "arithmetic"))
    return out


def items_for(settings: EpisodeSettings, tokenizer, probs) -> list[WorkItem]:
    env = make_environment(settings.environment, settings.options)
    return [
        WorkItem(p.id, p.answer, tuple(encode_prompt(tokenizer, episode_prompt(env, p))), p)
        for p in probs
    ]


@pytest.fixture(scope="module")
def sampler(toy_pair):
    from rollout.engine import EngineSettings

    s = Sampler.build(EngineSettings(model_path=str(toy_pair.student_dir), seed=0, kv_cache_mb=64))
    yield s
    s.close()


def answer_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(TOOL_ANSWER_OPEN + text + TOOL_ANSWER_CLOSE, add_special_tokens=False)


def test_episodes_call_the_tool_and_replay_identically(sampler):
    tok = sampler.tokenizer
    settings = EpisodeSettings(PLUS, EnvironmentOptions(seed=0), max_turns=3, max_episode_tokens=40)
    items = items_for(settings, tok, problems(3))
    req = SampleRequest(n=2, max_tokens=16, temperature=1.0, seed=11, episodes=settings)
    groups = dict(sampler.sample(items, req))
    assert sorted(groups) == [0, 1, 2]
    calls = 0
    for i, group in groups.items():
        assert [r.sample_id for r in group] == [f"q{i}/0", f"q{i}/1"]
        for r in group:
            ep: Episode = r.episode
            assert 1 <= len(ep.turns) <= 3 and len(r.response_ids) <= 40
            # Between two turns lie exactly the tool's rendered answer; each turn but the last
            # ended at the call's closing marker.
            # (one more when the last answer filled the budget: no turn after it)
            assert ep.tool_calls in (len(ep.turns) - 1, len(ep.turns))
            seed = mix_seed(req.seed + i, int(r.sample_id.split("/")[1]))
            for c, ((_, end), (nxt, _)) in enumerate(itertools.pairwise(ep.turns)):
                turn = tok.decode(list(r.response_ids[:end]), skip_special_tokens=True)
                assert turn.endswith("=")
                argument = turn[turn.rfind("+") + 1 : -1]
                want = seeded_tool(argument, episode_seed(seed, r.problem_id, c)).text
                assert list(r.response_ids[end:nxt]) == answer_ids(tok, want)
                assert set(r.logp_sampler[end:nxt]) == {0.0}
            calls += ep.tool_calls
    assert calls >= 3  # the toy student writes '=' within a few tokens: it really calls
    # Re-dispatched: prompts 1 and 2 alone, as a chunk that starts at prompt 1 (seed + 1).
    again = dict(sampler.sample(items[1:], dataclasses.replace(req, seed=req.seed + 1)))
    for i in (1, 2):
        for a, b in zip(groups[i], again[i - 1], strict=True):
            assert a.response_ids == b.response_ids and a.episode == b.episode
            assert a.logp_sampler == pytest.approx(b.logp_sampler, abs=1e-5)


def test_an_unclosed_call_is_cut_at_the_budget_and_counted(sampler):
    tok = sampler.tokenizer
    settings = EpisodeSettings(NEVER, EnvironmentOptions(seed=0), max_turns=3, max_episode_tokens=6)
    items = items_for(settings, tok, problems(2))
    req = SampleRequest(n=2, max_tokens=16, temperature=1.0, seed=5, episodes=settings)
    for _, group in sampler.sample(items, req):
        for r in group:
            assert len(r.response_ids) == 6 and r.finish_reason == "length"
            assert r.episode.turns == ((0, 6),) and r.episode.tool_calls == 0
            text = tok.decode(list(r.response_ids), skip_special_tokens=True)
            assert r.episode.cut == ("+" in text)
