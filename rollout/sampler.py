"""The student sampler as a plain object: an engine plus the building of ``Rollout`` records.

Usable without Ray (tests, the in-process mode); ``services.actors.StudentSampler`` only
forwards calls to it. The unit of work is a *chunk*: consecutive prompt groups of one step
(a group = the ``n`` samples of one prompt). The prompt at position ``i`` of a chunk is drawn
with seed ``SampleRequest.seed + i``, and the producer sets that seed from (run seed, step,
position in the step) (``services.scheduler.chunk_seed``), so a chunk re-run on another
sampler draws the same tokens.

With ``SampleRequest.episodes`` set, each sample is an episode with an environment
(``rollout.episodes``): sample k of the prompt at position i runs with the episode seed
``mix_seed(seed + i, k)`` (``rollout.episodes.start_groups``), so a re-run chunk replays the same tokens and the same tool answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rollout.episodes import EpisodeSettings, run_episodes, start_groups
from rollout.records import Rollout

if TYPE_CHECKING:
    from rollout.sources import Problem


@dataclass(frozen=True)
class WorkItem:
    """One prompt to sample: its ``n`` samples get ids ``<problem_id>/<k>``. problem: the
    problem itself, which an episode's environment starts from (None without episodes)."""

    problem_id: str
    answer: str
    prompt_ids: tuple[int, ...]
    problem: Problem | None = None


@dataclass(frozen=True)
class SampleRequest:
    """How to sample a chunk (plain values from the run config)."""

    n: int
    max_tokens: int
    temperature: float
    seed: int  # seed of the chunk's first prompt; prompt i of the chunk uses seed + i
    episodes: EpisodeSettings | None = None  # each sample an episode (module docstring)


class Sampler:
    """Student engine + Rollout building. ``version`` is the policy version it serves."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._tokenizer = None

    @classmethod
    def build(cls, spec) -> Sampler:
        """spec: ``rollout.engine.EngineSettings`` (or any object whose ``student_engine()``
        builds an engine with the StudentEngine methods)."""
        return cls(spec.student_engine())

    @property
    def version(self) -> int:
        return self.engine.version

    def sample(
        self, items: list[WorkItem], req: SampleRequest
    ) -> Iterator[tuple[int, list[Rollout]]]:
        """Yield ``(position in items, group)`` as each prompt's ``n`` samples finish.

        group: ``n`` Rollouts of one prompt, all stamped with the version that sampled them.
        """
        if req.episodes is not None:
            yield from self._sample_episodes(items, req)
            return
        version = self.engine.version
        stream = self.engine.generate_stream(
            [list(it.prompt_ids) for it in items],
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            n=req.n,
            seed=req.seed,
        )
        for index, gens in stream:
            item = items[index]
            yield (
                index,
                [
                    Rollout(
                        sample_id=f"{item.problem_id}/{k}",
                        problem_id=item.problem_id,
                        answer=item.answer,
                        prompt_ids=item.prompt_ids,
                        response_ids=g.token_ids,
                        logp_sampler=g.logprobs,
                        policy_version=version,
                        finish_reason=g.finish_reason,
                    )
                    for k, g in enumerate(gens)
                ],
            )

    def _sample_episodes(
        self, items: list[WorkItem], req: SampleRequest
    ) -> Iterator[tuple[int, list[Rollout]]]:
        """`sample` with an environment: a group is yielded when its ``n`` episodes end."""
        version = self.engine.version
        for item in items:
            if item.problem is None:
                raise ValueError(f"{item.problem_id}: an episode needs the WorkItem's problem")
        problems = [item.problem for item in items]
        prompt_ids = [item.prompt_ids for item in items]
        runs = start_groups(req.episodes, problems, prompt_ids, req.seed, req.n)
        left = [req.n] * len(items)
        for j in run_episodes(
            self.engine.generate,
            self.tokenizer,
            runs,
            req.episodes,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            max_model_len=self.engine.settings.max_model_len,
        ):
            i = j // req.n  # run i * n + k is sample k of item i (start_groups)
            left[i] -= 1
            if left[i] == 0:
                base = i * req.n
                group = [
                    _episode_rollout(items[i], k, runs[base + k], version) for k in range(req.n)
                ]
                yield i, group

    @property
    def tokenizer(self):
        """The student's tokenizer (decodes turns, renders an environment's answers)."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.engine.settings.model_path)
        return self._tokenizer

    def generate(self, prompt_ids: list[list[int]], **kwargs):
        return self.engine.generate(prompt_ids, **kwargs)

    def load_weights(self, named_tensors, version: int) -> tuple[int, float]:
        """Load pushed weights; returns (version now served, seconds spent loading)."""
        seconds = self.engine.load_weights(named_tensors, version)
        return self.engine.version, seconds

    def close(self) -> None:
        self.engine.close()


def _episode_rollout(item: WorkItem, k: int, run, version: int) -> Rollout:
    return Rollout(
        sample_id=f"{item.problem_id}/{k}",
        problem_id=item.problem_id,
        answer=item.answer,
        prompt_ids=item.prompt_ids,
        response_ids=tuple(run.ids),
        logp_sampler=tuple(run.logps),
        policy_version=version,
        finish_reason=run.finish,
        episode=run.record(),
    )
