"""Prompt sources: where training prompts and the held-out evaluation set come from.

Every source is deterministic given its seed and resumable: ``restore(state())`` on a fresh
source of the same kind and seed makes its next batch exactly what the uninterrupted source
would have given. Prompts longer than ``max_prompt_chars`` are skipped and counted in
``skipped``, never fatal; ``TokenLimitedSource`` does the same for prompts too long in tokens
for the engines (``skipped_tokens``), when a step's batch is drawn. Bad input (missing/empty
file, malformed record) raises ``SourceError`` naming the file and line: it replays
deterministically, so a run it stops is not resumed into it again (no resume command).

Kinds live in the ``SOURCES`` registry; each ``SourceKind`` owns its builder, its verifier
and the settings it needs, and the config, the CLI help and the demo read the registry
(``register_source`` adds one). Built in:
    ``arithmetic``     the built-in column-addition task (``rollout/tasks.py``); ``task`` is
                       ``"add"`` (default) or ``"add_sub"``.
    ``jsonl``          a file of ``{"prompt": str, "answer": str | number, "id"?: str}`` lines,
                       scored by the built-in ``#`` answer marker.
    ``reasoning_gym``  a procedural ``reasoning-gym`` task (``task="chain_sum"``, ...), scored by
                       that task's own ``score_answer`` on the text inside ``<answer>`` tags.
    ``chat``           a chat dataset (``rollout/chat_data.py``): JSONL, Parquet or a
                       ``save_to_disk`` folder of ``messages`` or ``prompt`` rows, answers
                       optional, columns mapped by ``task.fields``; scored by ``task.verifier``.

``score(problem, completion)`` scores any problem from any source: a ``Problem`` names its kind
and the verifier that scores it (``rollout/verifiers.py``; ``task.verifier``, else the kind's
default) and carries what that verifier needs (``meta``), so scoring can run in another process
than the source and never parses ids.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rollout import tasks
from rollout.prompting import Chat, PromptError
from services.errors import UserError

DEFAULT_MAX_PROMPT_CHARS = 512
RG_EVAL_SEED_OFFSET = 1_000_003  # reasoning-gym items use Random(seed + idx): keep eval far away
MAX_CONSECUTIVE_SKIPS = 10_000  # a generator whose prompts are all too long must fail, not spin
RG_INSTRUCTION = "\nGive only the final answer between <answer> and </answer> tags."


class SourceError(UserError, ValueError):
    """A prompt source was given input it cannot use (names the file and line when there is one)."""


@dataclass(frozen=True)
class Problem:
    """One prompt with its reference answer.

    ``id`` is unique within its source and stable across runs; ``source`` names where it came
    from (``arithmetic``, ``jsonl:<file stem>``, ``reasoning_gym:<task>``, ``chat:<file stem>``);
    ``prompt`` is a string (one user turn) or a ``rollout.prompting.Chat``; ``answer`` is ""
    for a prompt-only row (never scored); ``kind`` is the ``SOURCES`` key; ``verifier`` the
    verifier's name and arguments (``("regex", pattern)``; empty: the kind's default); ``meta``
    what that verifier needs beyond the answer (a tuple of plain values, so problems pickle and
    compare); ``teacher`` the name of the [[teachers]] entry that scores it (its data row's
    ``teacher`` field; empty: the run's first teacher).
    """

    id: str
    prompt: str | Chat
    answer: str
    source: str
    kind: str
    meta: tuple = ()
    verifier: tuple[str, ...] = ()
    teacher: str = ""


class PromptSource(Protocol):
    """What the sampler needs from a source of prompts."""

    skipped: int  # prompts dropped for exceeding max_prompt_chars, so far

    def next_batch(self, n: int) -> list[Problem]: ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...

    def eval_set(self) -> list[Problem]: ...


def _too_long(run: int, max_prompt_chars: int) -> None:
    if run >= MAX_CONSECUTIVE_SKIPS:
        raise SourceError(
            f"{run} consecutive prompts were longer than max_prompt_chars={max_prompt_chars}; raise it"
        )


def _check_state(state: Mapping[str, Any], expect: Mapping[str, Any]) -> int:
    """Validate that ``state`` came from a source like this one; return its position."""
    for key, want in expect.items():
        if state.get(key) != want:
            raise SourceError(
                f"cannot restore: state has {key}={state.get(key)!r}, this source has {want!r}"
            )
    position = state.get("position")
    if not isinstance(position, int) or position < 0:
        raise SourceError(f"cannot restore: bad position {position!r}")
    return position


class ArithmeticSource:
    """The built-in task: unlimited seeded training problems, fixed 200-problem eval set."""

    def __init__(
        self,
        *,
        seed: int = 0,
        task: str | None = None,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    ):
        ops_by_task = {"add": ("+",), "add_sub": ("+", "-")}
        task = task or "add"
        if task not in ops_by_task:
            raise SourceError(
                f"unknown arithmetic task {task!r}; expected one of {sorted(ops_by_task)}"
            )
        self.task, self.seed, self.max_prompt_chars = task, seed, max_prompt_chars
        self._gen = tasks.ArithmeticGenerator(seed, ops_by_task[task])
        self.skipped = 0

    def _problem(self, p: tasks.Arithmetic) -> Problem:
        return Problem(
            id=f"arith:{p.key}",
            prompt=p.prompt,
            answer=p.answer,
            source="arithmetic",
            kind="arithmetic",
        )

    def next_batch(self, n: int) -> list[Problem]:
        out: list[Problem] = []
        run = 0
        while len(out) < n:
            p = self._gen.next()
            if len(p.prompt) > self.max_prompt_chars:
                self.skipped += 1
                run += 1
                _too_long(run, self.max_prompt_chars)
                continue
            run = 0
            out.append(self._problem(p))
        return out

    def state(self) -> dict[str, Any]:
        return {
            "kind": "arithmetic",
            "task": self.task,
            "seed": self.seed,
            "position": self._gen.position,
            "skipped": self.skipped,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        position = _check_state(state, {"kind": "arithmetic", "task": self.task, "seed": self.seed})
        self._gen.skip_to(position)
        self.skipped = int(state.get("skipped", 0))

    def eval_set(self) -> list[Problem]:
        problems = [self._problem(p) for p in tasks.eval_problems(self._gen.ops)]
        return [p for p in problems if len(p.prompt) <= self.max_prompt_chars]


class JsonlSource:
    """Records from a JSONL file, reshuffled (seeded) every epoch.

    The evaluation set is ``eval_path`` when given; otherwise a seeded ``eval_fraction`` of the
    file (at most ``tasks.EVAL_SIZE`` records) held out from training.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        seed: int = 0,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
        eval_path: str | Path | None = None,
        eval_fraction: float = 0.1,
    ):
        self.path, self.seed, self.max_prompt_chars = Path(path), seed, max_prompt_chars
        self.skipped = 0
        records = self._load(self.path)
        if eval_path is not None:
            self._eval = self._load(Path(eval_path))
            self._train = records
        else:
            order = list(range(len(records)))
            random.Random(f"jsonl-eval:{seed}").shuffle(order)
            n_eval = min(tasks.EVAL_SIZE, int(len(records) * eval_fraction))
            held = set(order[:n_eval])
            self._eval = [r for i, r in enumerate(records) if i in held]
            self._train = [r for i, r in enumerate(records) if i not in held]
        if not self._train:
            raise SourceError(
                f"{self.path}: no training records left after holding out the eval set"
            )
        self._position = 0
        self._order_epoch = -1
        self._order: list[int] = []

    def _load(self, path: Path) -> list[Problem]:
        """Parse and validate every line; over-long prompts are counted in ``skipped``."""
        if not path.is_file():
            raise SourceError(f"{path}: no such file")
        problems: list[Problem] = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                problem = self._parse(path, line_no, line)
                if len(problem.prompt) > self.max_prompt_chars:
                    self.skipped += 1
                    continue
                problems.append(problem)
        if not problems:
            why = (
                f" ({self.skipped} prompts longer than {self.max_prompt_chars} chars skipped)"
                if self.skipped
                else ""
            )
            raise SourceError(f"{path}: no usable records{why}")
        return problems

    @staticmethod
    def _parse(path: Path, line_no: int, line: str) -> Problem:
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(record, dict):
            raise SourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
        prompt, answer = record.get("prompt"), record.get("answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise SourceError(f"{where}: record has no non-empty string 'prompt'")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float):
            raise SourceError(f"{where}: record has no 'answer' (string or number)")
        record_id = record.get("id", f"{path.stem}:{line_no}")
        teacher = record.get("teacher", "")
        if not isinstance(teacher, str):
            raise SourceError(f"{where}: 'teacher' must be a teacher's name (a string)")
        return Problem(
            id=f"jsonl:{record_id}",
            prompt=prompt,
            answer=str(answer),
            source=f"jsonl:{path.stem}",
            kind="jsonl",
            teacher=teacher,
        )

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self._train))
        if epoch != self._order_epoch:
            self._order = list(range(len(self._train)))
            random.Random(f"jsonl:{self.seed}:{epoch}").shuffle(self._order)
            self._order_epoch = epoch
        return self._order[offset]

    def next_batch(self, n: int) -> list[Problem]:
        out = [self._train[self._index(self._position + i)] for i in range(n)]
        self._position += n
        return out

    def state(self) -> dict[str, Any]:
        return {
            "kind": "jsonl",
            "path": str(self.path),
            "seed": self.seed,
            "position": self._position,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self._position = _check_state(
            state, {"kind": "jsonl", "path": str(self.path), "seed": self.seed}
        )

    def eval_set(self) -> list[Problem]:
        return list(self._eval)

    def teachers(self) -> dict[str, str]:
        """Each teacher name its rows give (their ``teacher`` field) → the first such row."""
        named: dict[str, str] = {}
        for p in self._train + self._eval:
            named.setdefault(p.teacher, f"{p.id} ({p.source})")
        return named


@functools.cache
def _rg_dataset(task: str, seed: int, config_json: str):
    import reasoning_gym  # heavy-ish (1 s); only sources of this kind pay for it

    try:
        return reasoning_gym.create_dataset(
            task, seed=seed, size=2**31 - 1, **json.loads(config_json)
        )
    except (ValueError, TypeError) as e:  # unknown task or bad config: reword at our boundary
        raise SourceError(f"reasoning_gym task {task!r}: {e}") from e


class ReasoningGymSource:
    """A procedural ``reasoning-gym`` task; item ``i`` is a pure function of (task, seed, i).

    Training draws items ``seed, 0..`` and skips any question that is in the eval set, which is
    items ``0..eval_size-1`` of seed ``seed + RG_EVAL_SEED_OFFSET``.
    """

    def __init__(
        self,
        task: str,
        *,
        seed: int = 0,
        max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
        task_config: Mapping[str, Any] | None = None,
        eval_size: int = tasks.EVAL_SIZE,
    ):
        self.task, self.seed, self.max_prompt_chars = task, seed, max_prompt_chars
        self._config = json.dumps(dict(task_config or {}), sort_keys=True)
        self._eval_seed = seed + RG_EVAL_SEED_OFFSET
        self._eval = [
            p for p in (self._item(self._eval_seed, i) for i in range(eval_size)) if self._fits(p)
        ]
        self._eval_prompts = {p.prompt for p in self._eval}
        self._position = 0
        self.skipped = 0
        self.max_collisions = MAX_CONSECUTIVE_SKIPS  # training items in a row found in eval

    def _item(self, seed: int, idx: int) -> Problem:
        entry = _rg_dataset(self.task, seed, self._config)[idx]
        return Problem(
            id=f"reasoning_gym:{self.task}:{seed}:{idx}:{self._config}",
            prompt=entry["question"] + RG_INSTRUCTION,
            answer=str(entry["answer"]),
            source=f"reasoning_gym:{self.task}",
            kind="reasoning_gym",
            meta=(self.task, seed, idx, self._config),
        )

    def _fits(self, p: Problem) -> bool:
        return len(p.prompt) <= self.max_prompt_chars

    def next_batch(self, n: int) -> list[Problem]:
        out: list[Problem] = []
        run = collisions = 0
        while len(out) < n:
            p = self._item(self.seed, self._position)
            self._position += 1
            if not self._fits(p):
                self.skipped += 1
                run += 1
                _too_long(run, self.max_prompt_chars)
                continue
            run = 0
            if p.prompt in self._eval_prompts:
                collisions += 1
                if collisions >= self.max_collisions:
                    raise SourceError(
                        f"reasoning_gym task {self.task!r}: {collisions} training items in a row "
                        f"are questions of the eval set ({len(self._eval_prompts)} distinct questions): the task "
                        f"has too few distinct questions; lower task.eval_size or widen the task"
                    )
                continue
            collisions = 0
            out.append(p)
        return out

    def state(self) -> dict[str, Any]:
        return {
            "kind": "reasoning_gym",
            "task": self.task,
            "seed": self.seed,
            "config": self._config,
            "position": self._position,
            "skipped": self.skipped,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        expect = {
            "kind": "reasoning_gym",
            "task": self.task,
            "seed": self.seed,
            "config": self._config,
        }
        self._position = _check_state(state, expect)
        self.skipped = int(state.get("skipped", 0))

    def eval_set(self) -> list[Problem]:
        return list(self._eval)


@dataclass(frozen=True)
class SourceOptions:
    """Everything a source may be built from (each kind reads what it needs).

    path: file (jsonl; chat: also parquet or a save_to_disk folder). task: task name
    (arithmetic: add | add_sub; reasoning_gym: any task). seed, max_prompt_chars: see the
    module docstring. task_config: reasoning-gym task options. eval_path: a separate held-out
    file (jsonl, chat). verifier: (name, *arguments) replacing the kind's default verifier.
    fields, chat_template_kwargs: the chat source's column names and template options.
    """

    seed: int
    max_prompt_chars: int
    path: str | Path | None = None
    task: str | None = None
    task_config: Mapping[str, Any] | None = None
    eval_path: str | Path | None = None
    verifier: tuple[str, ...] = ()
    fields: Mapping[str, str] | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class SourceKind:
    """One registered kind of prompt source.

    name: the ``task.source`` value. doc: one line for the CLI help and ``opdplus config``.
    build: options → a ``PromptSource``. verifier: the name of the default verifier
    (``rollout.verifiers.VERIFIERS``) of its problems; ``task.verifier`` replaces it.
    requires: ``SourceOptions`` fields that must be set (named by their config key in errors,
    ``task.<field>``; the config key for ``task`` is ``task.name``).
    """

    name: str
    doc: str
    build: Callable[[SourceOptions], PromptSource]
    verifier: str
    requires: tuple[str, ...] = ()


SOURCES: dict[str, SourceKind] = {}
# Config key under [task] of each SourceOptions field that a kind may require.
OPTION_KEYS = {"path": "task.path", "task": "task.name"}


def register_source(kind: SourceKind) -> SourceKind:
    """Add a kind to ``SOURCES`` (its name must be new)."""
    if kind.name in SOURCES:
        raise ValueError(f"prompt source {kind.name!r} is already registered")
    unknown = set(kind.requires) - set(OPTION_KEYS)
    if unknown:
        raise ValueError(f"{kind.name}: requires unknown options {sorted(unknown)}")
    SOURCES[kind.name] = kind
    return kind


def get_source_kind(name: str) -> SourceKind:
    if name not in SOURCES:
        raise SourceError(f"unknown source kind {name!r}; expected one of {', '.join(SOURCES)}")
    return SOURCES[name]


register_source(
    SourceKind(
        name="arithmetic",
        doc="the built-in column-addition task (task.name: add | add_sub)",
        build=lambda o: ArithmeticSource(
            seed=o.seed, task=o.task, max_prompt_chars=o.max_prompt_chars
        ),
        verifier="marker",
    )
)
register_source(
    SourceKind(
        name="jsonl",
        doc="a JSONL file of {prompt, answer} records (task.path)",
        build=lambda o: JsonlSource(
            o.path, seed=o.seed, max_prompt_chars=o.max_prompt_chars, eval_path=o.eval_path
        ),
        verifier="marker",
        requires=("path",),
    )
)
register_source(
    SourceKind(
        name="reasoning_gym",
        doc="a reasoning-gym task (task.name, e.g. chain_sum), scored by the task itself",
        build=lambda o: ReasoningGymSource(
            o.task, seed=o.seed, max_prompt_chars=o.max_prompt_chars, task_config=o.task_config
        ),
        verifier="reasoning_gym",
        requires=("task",),
    )
)


def _build_chat(o: SourceOptions) -> PromptSource:
    from rollout.chat_data import ChatSource

    def problem(row) -> Problem:
        return Problem(
            id=f"chat:{row.row_id}",
            prompt=row.chat,
            answer=row.answer,
            source=f"chat:{Path(o.path).stem}",
            kind="chat",
            teacher=row.teacher,
        )

    return ChatSource(
        o.path,
        seed=o.seed,
        max_prompt_chars=o.max_prompt_chars,
        make_problem=problem,
        eval_path=o.eval_path,
        fields=o.fields,
        template_kwargs=o.chat_template_kwargs,
    )


register_source(
    SourceKind(
        name="chat",
        doc="a chat dataset: JSONL, Parquet or a save_to_disk folder of messages/prompt rows "
        "(task.path; task.fields, task.eval_path, task.verifier)",
        build=_build_chat,
        verifier="marker",
        requires=("path",),
    )
)


class TokenLimitedSource:
    """``source`` without the prompts the engines could not take: a prompt of more than
    ``max_prompt_tokens`` tokens (the engines' context, ``rollout.max_model_len``, minus the
    response's ``rollout.max_tokens`` and the one position the scorer reads past it) is skipped when a step's batch is drawn and counted in
    ``skipped_tokens``, like ``max_prompt_chars``; evaluation prompts over ``max_eval_tokens``
    are left out of ``eval_set`` (counted in ``eval_skipped_tokens``). Deterministic and
    resumable like the source it wraps (its count travels in ``state()``); ``encode`` is the
    run's prompt → token ids function, so the count is what the samplers would be given."""

    def __init__(
        self,
        source: PromptSource,
        encode: Callable[[str], list[int]],
        *,
        max_prompt_tokens: int,
        max_eval_tokens: int,
    ) -> None:
        if max_prompt_tokens < 1:
            raise SourceError(
                f"no room for a prompt: max_prompt_tokens = {max_prompt_tokens} "
                f"(rollout.max_model_len − rollout.max_tokens − 1)"
            )
        self.source, self.encode = source, encode
        self.max_prompt_tokens, self.max_eval_tokens = max_prompt_tokens, max_eval_tokens
        self.skipped_tokens = 0
        self.eval_skipped_tokens = 0

    @property
    def skipped(self) -> int:
        return self.source.skipped

    def _fits(self, p: Problem, limit: int) -> bool:
        try:
            return len(self.encode(p.prompt)) <= limit
        except PromptError as e:  # a template rejecting this chat: name the row
            raise SourceError(f"{p.id} ({p.source}): {e}") from None

    def next_batch(self, n: int) -> list[Problem]:
        out: list[Problem] = []
        run = 0
        while len(out) < n:
            for p in self.source.next_batch(n - len(out)):
                if self._fits(p, self.max_prompt_tokens):
                    run = 0
                    out.append(p)
                    continue
                self.skipped_tokens += 1
                run += 1
                if run >= MAX_CONSECUTIVE_SKIPS:
                    raise SourceError(
                        f"{run} prompts in a row were longer than {self.max_prompt_tokens} "
                        f"tokens (rollout.max_model_len − rollout.max_tokens − 1); raise "
                        f"rollout.max_model_len or lower task.max_prompt_chars"
                    )
        return out

    def state(self) -> dict[str, Any]:
        return {**self.source.state(), "skipped_tokens": self.skipped_tokens}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.source.restore(state)
        self.skipped_tokens = int(state.get("skipped_tokens", 0))

    def eval_set(self) -> list[Problem]:
        problems = self.source.eval_set()
        kept = [p for p in problems if self._fits(p, self.max_eval_tokens)]
        self.eval_skipped_tokens = len(problems) - len(kept)
        return kept


def skipped_metrics(source_state: Mapping[str, Any]) -> dict[str, float]:
    """The run's prompts skipped so far, from a source's ``state()``: for being longer than
    ``task.max_prompt_chars`` (``data/skipped_long_chars``) or than the engines' context
    (``data/skipped_long_tokens``)."""
    source_state = source_state or {}
    keys = {"skipped": "data/skipped_long_chars", "skipped_tokens": "data/skipped_long_tokens"}
    return {metric: float(source_state[key]) for key, metric in keys.items() if key in source_state}


def score(problem: Problem, completion: str) -> float:
    """Reward in [0, 1] for ``completion`` (decoded response text, no prompt) to ``problem``,
    by its verifier (``problem.verifier``, else its kind's default)."""
    from rollout.verifiers import score_with

    kind = SOURCES.get(problem.kind)
    if kind is None:
        raise SourceError(
            f"problem {problem.id!r} has unknown source kind {problem.kind!r} "
            f"(source {problem.source!r})"
        )
    return score_with(
        problem.verifier[0] if problem.verifier else kind.verifier, problem, completion
    )


def sample_problems(source: PromptSource, n: int = 8) -> list[Problem]:
    """Problems to check the prompt rendering on at a run's start, without advancing
    ``source``: its own ``sample()`` when it has one (the chat source: one row per distinct
    sequence of roles), else the first ``n`` of its evaluation set."""
    if isinstance(source, TokenLimitedSource):  # the prompts before the token filter
        source = source.source
    if hasattr(source, "sample"):
        return source.sample()
    return source.eval_set()[:n]


def make_source(
    kind: str,
    *,
    path: str | Path | None = None,
    seed: int = 0,
    task: str | None = None,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    task_config: Mapping[str, Any] | None = None,
    eval_path: str | Path | None = None,
    verifier: str = "",
    verifier_pattern: str = "",
    fields: Mapping[str, str] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> PromptSource:
    """Build a registered source by kind (``SOURCES``); missing required options are named.
    ``verifier`` (+ ``verifier_pattern`` for ``regex``) replaces the kind's default verifier."""
    from rollout.verifiers import check_verifier

    spec = get_source_kind(kind)
    if max_prompt_chars <= 0:
        raise SourceError(f"max_prompt_chars must be positive, got {max_prompt_chars}")
    if verifier:
        why = check_verifier(verifier, source=kind, pattern=verifier_pattern)
        if why:
            raise SourceError(f"task.verifier: {why}")
    options = SourceOptions(
        seed=seed,
        max_prompt_chars=max_prompt_chars,
        path=path,
        task=task,
        task_config=task_config,
        eval_path=eval_path,
        fields=fields,
        chat_template_kwargs=chat_template_kwargs,
    )
    for field_name in spec.requires:
        if not getattr(options, field_name):
            raise SourceError(f"{kind} source needs {OPTION_KEYS[field_name]} ({spec.doc})")
    source = spec.build(options)
    if not verifier:
        return source
    from rollout.verifiers import get_verifier

    args = (verifier_pattern,) if get_verifier(verifier).needs_pattern else ()
    return VerifiedSource(source, (verifier, *args))


class VerifiedSource:
    """``source`` whose problems are scored by ``verifier`` (name, *arguments) instead of its
    kind's default (``task.verifier``); otherwise the same source, state included."""

    def __init__(self, source: PromptSource, verifier: tuple[str, ...]) -> None:
        self.source, self.verifier = source, verifier

    def _tag(self, problems: list[Problem]) -> list[Problem]:
        return [dataclasses.replace(p, verifier=self.verifier) for p in problems]

    @property
    def skipped(self) -> int:
        return self.source.skipped

    def next_batch(self, n: int) -> list[Problem]:
        return self._tag(self.source.next_batch(n))

    def state(self) -> dict[str, Any]:
        return self.source.state()

    def restore(self, state: Mapping[str, Any]) -> None:
        self.source.restore(state)

    def eval_set(self) -> list[Problem]:
        return self._tag(self.source.eval_set())

    def sample(self) -> list[Problem]:
        return self._tag(sample_problems(self.source))

    def __getattr__(self, name: str):  # the chat source's counts, eval_prompts, ...
        if name.startswith("__") or name == "source":  # copy/pickle probe a bare instance
            raise AttributeError(name)
        attr = getattr(self.source, name)
        return (lambda *a, **k: self._tag(attr(*a, **k))) if name == "eval_prompts" else attr
