"""Episodes: the student writes a turn, an environment answers, the student goes on (issue 22,
docs/math.md §10). The loop the sampler (``rollout.sampler``) and the held-out evaluation
(``rollout.accuracy``) share; plain objects, no Ray.

All active episodes generate their next turn together (one ``generate`` call per round). A turn ends
at one of the environment's stop strings (a tool call's closing marker), at EOS, or at a token
limit. After a call the environment's ``step`` answers it; the answer, rendered by
``rollout.prompting.encode_environment_answer``, is appended as tokens (sampler log-prob 0.0,
student mask 0) and the episode goes on. An episode ends at EOS, after ``max_turns`` student
turns, or when its trajectory (student and environment tokens after the prompt) reaches
``max_episode_tokens``; a turn cut by a limit inside an open call is counted (``Episode.cut``).

Seeds: turn t of an episode samples with ``turn_seed(episode seed, t)`` and the environment is
seeded with the episode seed, so replaying an episode (a re-dispatched chunk) gives the same
tokens and the same tool answers, whatever else runs beside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from rollout.environments import Environment, EnvironmentOptions, episode_prompt, make_environment
from rollout.prompting import Chat, Turn, encode_environment_answer
from rollout.records import Episode

FINISH_BUDGET = "length"  # an episode cut by max_turns or its token budget


@dataclass(frozen=True)
class EpisodeSettings:
    """How samples run as episodes (plain config values).

    environment: the ``rollout.environments.ENVIRONMENTS`` name; options: what it is built
    from (its seed is replaced by each episode's); max_turns: student turns per episode;
    max_episode_tokens: tokens after the prompt (student and environment) per episode.
    """

    environment: str
    options: EnvironmentOptions
    max_turns: int
    max_episode_tokens: int

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.max_episode_tokens < 1:
            raise ValueError(
                f"max_turns {self.max_turns} and max_episode_tokens "
                f"{self.max_episode_tokens} must be >= 1"
            )

    def environment_for(self, seed: int) -> Environment:
        """A fresh environment for the episode seeded ``seed``."""
        return make_environment(self.environment, replace(self.options, seed=seed))

    def prompt(self, problem) -> Chat:
        """The prompt an episode on ``problem`` starts from (``episode_prompt``: the system
        message, if any, then the problem's turns): what the producer encodes."""
        return episode_prompt(self.environment_for(self.options.seed), problem)


def mix_seed(*parts: int | str, bits: int = 63) -> int:
    """A seed of ``bits`` bits from ``parts`` (sha256: stable across processes and versions)."""
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - bits)


def turn_seed(episode_seed: int, turn: int) -> int:
    """The engine seed of turn ``turn`` of an episode (32 bits: what any engine takes)."""
    return mix_seed(episode_seed, "turn", turn, bits=32)


@dataclass
class EpisodeRun:
    """One episode as it runs; ``record()`` gives its ``rollout.records.Episode``."""

    env: Environment
    prompt: object  # rollout.prompting.Prompt: the episode's first prompt
    prompt_ids: tuple[int, ...]
    seed: int
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    turns: list[tuple[int, int]] = field(default_factory=list)
    exchanged: list[Turn] = field(default_factory=list)
    tool_calls: int = 0
    tool_errors: int = 0
    cut: bool = False
    finish: str | None = None  # set when the episode is over

    def record(self) -> Episode:
        return Episode(tuple(self.turns), self.tool_calls, self.tool_errors, self.cut)

    def student_text(self, tokenizer) -> str:
        """The student's turns, decoded and joined: what a verifier scores (a tool's answer
        can never supply the student's answer)."""
        return "".join(
            tokenizer.decode(self.ids[a:b], skip_special_tokens=True) for a, b in self.turns
        )


def start_episode(settings: EpisodeSettings, problem, prompt_ids, seed: int) -> EpisodeRun:
    """A new episode on ``problem`` whose prompt encodes as ``prompt_ids`` (the producer encoded
    ``episode_prompt`` of the same environment kind)."""
    env = settings.environment_for(seed)
    return EpisodeRun(env, episode_prompt(env, problem), tuple(prompt_ids), seed)


def start_groups(
    settings: EpisodeSettings, problems: Sequence, prompt_ids: Sequence, seed: int, n: int
) -> list[EpisodeRun]:
    """The ``n`` episodes of each problem, problem by problem: run ``i * n + k`` is sample k of
    problem i, seeded ``mix_seed(seed + i, k)`` — ``seed + i`` is the prompt's own seed
    (a chunk's position i), so a prompt dealt in another chunk replays the same episodes."""
    return [
        start_episode(settings, problem, ids, mix_seed(seed + i, k))
        for i, (problem, ids) in enumerate(zip(problems, prompt_ids, strict=True))
        for k in range(n)
    ]


def run_episodes(
    generate,
    tokenizer,
    runs: Sequence[EpisodeRun],
    settings: EpisodeSettings,
    *,
    max_tokens: int,
    temperature: float,
    max_model_len: int,
) -> Iterator[int]:
    """Run ``runs`` to their end, yielding each one's index as it ends (module docstring).

    generate: ``StudentEngine.generate`` or anything with its signature (per-prompt max_tokens
    and seeds, stop strings; e.g. ``RolloutService.generate``: a live sampler); tokenizer: the
    student's; max_tokens: the most tokens of one student turn; max_model_len: the engines'.
    """
    room = max_model_len - 1  # the scorer reads one position past the end
    active = list(range(len(runs)))
    for turn in range(settings.max_turns):
        limits = {}
        for i in active:
            r = runs[i]
            left = min(
                settings.max_episode_tokens - len(r.ids), room - len(r.prompt_ids) - len(r.ids)
            )
            if left < 1:
                r.finish = FINISH_BUDGET
                yield i
            else:
                limits[i] = min(max_tokens, left)
        active = list(limits)
        if not active:
            return
        generations = generate(
            [list(runs[i].prompt_ids) + runs[i].ids for i in active],
            max_tokens=[limits[i] for i in active],
            temperature=temperature,
            n=1,
            seed=[turn_seed(runs[i].seed, turn) for i in active],
            stop=tuple(dict.fromkeys(s for i in active for s in runs[i].env.stop)),
        )
        going = []
        for i, (gen,) in zip(active, generations, strict=True):
            if _take_turn(runs[i], gen, tokenizer, settings, last=turn + 1 == settings.max_turns):
                going.append(i)
            else:
                yield i
        active = going


def _take_turn(run: EpisodeRun, gen, tokenizer, settings: EpisodeSettings, *, last: bool) -> bool:
    """Append one generated turn (and the environment's answer); False when the episode ends."""
    start = len(run.ids)
    run.ids += gen.token_ids
    run.logps += gen.logprobs
    if gen.token_ids:
        run.turns.append((start, len(run.ids)))
    text = tokenizer.decode(list(gen.token_ids), skip_special_tokens=True)
    if gen.stop_string is None or gen.stop_string not in run.env.stop:
        # EOS, a stop token, a token limit or an abort: the episode is over.
        run.cut = gen.finish_reason == "length" and run.env.pending(text)
        run.finish = gen.finish_reason
        return False
    if last:  # the call is made but max_turns leaves no turn to use its answer
        run.finish = FINISH_BUDGET
        return False
    step = run.env.step(text)
    if step.done:
        run.finish = "stop"
        return False
    run.tool_calls += step.tool_calls
    run.tool_errors += step.tool_errors
    run.exchanged.append(Turn("assistant", text))
    answer = encode_environment_answer(tokenizer, run.prompt, run.exchanged, step.turns)
    run.exchanged.extend(step.turns)
    left = settings.max_episode_tokens - len(run.ids)
    run.ids += answer[:left]
    run.logps += [0.0] * len(answer[:left])  # the sampler did not draw them
    if len(answer) >= left:  # no room for a student token after the answer
        run.finish = FINISH_BUDGET
        return False
    return True


def episode_metrics(rollouts: Sequence) -> dict[str, float]:
    """The ``episode/…`` metrics of a batch of ``rollout.records.Rollout`` (empty when none is
    an episode): per episode, the mean student turns, tool calls and tool errors; the fraction
    of episodes with a tool call, and with a call cut by a token limit; tokens by role."""
    episodes = [r for r in rollouts if r.episode is not None]
    if not episodes:
        return {}
    n = len(episodes)
    student = sum(r.episode.student_tokens for r in episodes)
    return {
        "episode/turns_mean": sum(len(r.episode.turns) for r in episodes) / n,
        "episode/tool_calls_mean": sum(r.episode.tool_calls for r in episodes) / n,
        "episode/tool_errors_mean": sum(r.episode.tool_errors for r in episodes) / n,
        "episode/tool_call_rate": sum(r.episode.tool_calls > 0 for r in episodes) / n,
        "episode/cut_frac": sum(r.episode.cut for r in episodes) / n,
        "episode/student_tokens": float(student),
        "episode/environment_tokens": float(sum(len(r.response_ids) for r in episodes) - student),
    }
