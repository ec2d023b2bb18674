"""The toy tool pair: two-digit multiplication, which the teacher does with the calculator and
the student mostly tries in its head (issue 22's toy tool task).

A teacher trajectory, as the samplers' episodes produce it for a tokenizer without a chat
template (the tool's answer appended as ``[`` + value + ``]``: ``rollout.prompting``'s
TOOL_ANSWER_OPEN / TOOL_ANSWER_CLOSE)::

    [BOS] 37*58=  <calc>37*58</calc>  [2146]  #2146 [EOS]
          prompt  student turn 1      tool    student turn 2

The student's turn ends at ``</calc>`` (the ``calculator`` environment's stop string); the
calculator answers the call; the answer follows the marker ``#`` (``rollout.tasks.verify``).
A 0.1 M-parameter character model cannot multiply in its head, but copying the call and the
tool's answer is easy for it, so:

* teacher: trained on tool trajectories only (loss on its own tokens; the tool's ``[...]``
  tokens are masked), until the calculator-in-the-loop greedy accuracy on a dev set is >= 98 %.
* student: smaller; trained on tool trajectories first (it learns the call's format and to
  copy the tool's answer), then mostly on direct answers (``37*58=#2146``, 5 % tool
  trajectories): it knows how to use the calculator but rarely calls it — greedily never, so
  it is almost always wrong; sampling, it starts a call ~3 % of the time — room for OPD+ to
  teach it the teacher's habit.

The problems are every ``a*b`` with 10 <= a, b <= 99; a fixed seeded 200 are held out. The
builder writes them as JSONL for the ``jsonl`` source (``<out>/data/train.jsonl``,
``heldout.jsonl``; ``deploy/configs/toy_tool.toml``). Builds are deterministic and cached
exactly like ``models/toy.py`` (its tokenizer, model shapes, LR schedule, spec hash, build
lock and folder writer are reused). ``greedy_episodes`` is the build's own plain-torch greedy
episode loop with the real ``calculator`` environment in it; the project's evaluation goes
through the samplers.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from models.common import build_lock, save_model_folder
from models.toy import (
    ModelSpec,
    TrainSpec,
    _cached,
    _lr_at,
    _new_model,
    _spec_hash,
    build_tokenizer,
)
from rollout import prompting, tasks
from rollout.environments import EnvironmentOptions, make_environment
from rollout.prompting import TOOL_ANSWER_CLOSE, TOOL_ANSWER_OPEN, Turn
from rollout.sources import Problem

ENVIRONMENT = "calculator"
CALL_OPEN, CALL_CLOSE = "<calc>", "</calc>"
# Digits and operators, the call's markers, the tool answer's brackets, and lower-case letters,
# space and punctuation so that a calculator error ("error: not an arithmetic expression: ...")
# reaches the student as text rather than as <unk>s.
VOCAB_CHARS = "0123456789+-*/%=#;.()<>[]" + string.ascii_lowercase + " :'"
LOW, HIGH = 10, 99  # operand range: two digits each
EVAL_SEED, EVAL_SIZE = 22_022, 200
DEV_SEED, DEV_SIZE = 4_343, 200  # dev problems for early stopping, drawn from the training set
MAX_TURNS = 3  # greedy_episodes: student turns per episode
MAX_NEW_TOKENS = 40  # greedy_episodes: student tokens per episode (a trajectory uses <= 24)
TASK_VERSION = 1  # bump when the task, its formats or VOCAB_CHARS change


@dataclass(frozen=True)
class Product:
    """One problem ``a*b=``, its answer and its two gold completions."""

    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}*{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a * self.b)

    @property
    def id(self) -> str:
        return f"mul:{self.a}*{self.b}"

    def tool_segments(self) -> list[tuple[str, bool]]:
        """(text, the student's own) for the teacher's trajectory after the prompt (EOS not
        included): the call, the tool's answer (not the student's), the answer."""
        answer = TOOL_ANSWER_OPEN + self.answer + TOOL_ANSWER_CLOSE
        return [
            (f"{CALL_OPEN}{self.a}*{self.b}{CALL_CLOSE}", True),
            (answer, False),
            (tasks.ANSWER_MARKER + self.answer, True),
        ]

    def direct_segments(self) -> list[tuple[str, bool]]:
        """The answer without the tool: ``#2146``."""
        return [(tasks.ANSWER_MARKER + self.answer, True)]

    def problem(self) -> Problem:
        """As the ``jsonl`` source gives it (``deploy/configs/toy_tool.toml``)."""
        return Problem(
            id=f"jsonl:{self.id}",
            prompt=self.prompt,
            answer=self.answer,
            source="jsonl:train",
            kind="jsonl",
        )


def all_products() -> list[Product]:
    return [Product(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1)]


def split() -> tuple[list[Product], list[Product]]:
    """(training problems, the fixed held-out set of ``EVAL_SIZE``), disjoint."""
    problems = all_products()
    held = set(random.Random(EVAL_SEED).sample(range(len(problems)), EVAL_SIZE))
    train = [p for i, p in enumerate(problems) if i not in held]
    return train, [problems[i] for i in sorted(held)]


def dev_problems(train: list[Product]) -> list[Product]:
    return random.Random(DEV_SEED).sample(train, DEV_SIZE)


@dataclass(frozen=True)
class Mix:
    """Which gold completion an SFT example gets: the tool trajectory for every example of the
    first ``tool_steps`` steps, then with probability ``tool_share``, else the direct answer."""

    tool_steps: int = 0
    tool_share: float = 1.0


@dataclass(frozen=True)
class ToolPairSpec:
    teacher: ModelSpec = ModelSpec(hidden=64, layers=2, heads=2, ffn=256)
    teacher_train: TrainSpec = TrainSpec(
        max_steps=600, batch=64, lr=3e-3, warmup=20, eval_every=50, stop_at_dev_acc=0.98
    )
    student: ModelSpec = ModelSpec(hidden=32, layers=2, heads=1, ffn=128)
    student_train: TrainSpec = TrainSpec(max_steps=450, batch=64, lr=3e-3, eval_every=0)
    # The student first learns the tool's format (copying the call and the answer takes a
    # model this small ~300 steps), then mostly answers directly: it knows how to use the
    # calculator but rarely calls it (p(call first) ~ 0.03, greedily never).
    student_mix: Mix = Mix(tool_steps=300, tool_share=0.05)


@dataclass(frozen=True)
class ToolPair:
    teacher_dir: Path
    student_dir: Path
    train_path: Path  # JSONL {prompt, answer, id} for the jsonl source
    heldout_path: Path
    report: dict = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Episode:
    """One greedy episode: the text after the prompt (student and tool tokens), the tool calls
    made, whether the answer is right."""

    text: str
    tool_calls: int
    correct: bool


def _encode_example(
    tokenizer, product: Product, segments: list[tuple[str, bool]]
) -> tuple[list[int], list[int]]:
    """ids and labels of ``[BOS] prompt segments [EOS]``: labels are -100 on the prompt and on
    every segment that is not the student's (the tool's answer)."""
    ids = prompting.encode_prompt(tokenizer, product.prompt)
    labels = [-100] * len(ids)
    for text, own in segments:
        seg = tokenizer.encode(text, add_special_tokens=False)
        ids += seg
        labels += seg if own else [-100] * len(seg)
    ids.append(tokenizer.eos_token_id)
    labels.append(tokenizer.eos_token_id)
    return ids, labels


def _batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids_BT, attention_mask_BT, labels_BT."""
    width = max(len(ids) for ids, _ in rows)
    ids_BT = torch.full((len(rows), width), pad_id)
    labels_BT = torch.full((len(rows), width), -100)
    mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        ids_BT[i, : len(ids)] = torch.tensor(ids)
        labels_BT[i, : len(labels)] = torch.tensor(labels)
        mask_BT[i, : len(ids)] = 1
    return ids_BT, mask_BT, labels_BT


@torch.no_grad()
def greedy_episodes(
    model,
    tokenizer,
    products: list[Product],
    *,
    max_turns: int = MAX_TURNS,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[Episode]:
    """Greedy episodes with the calculator in the loop, all problems decoded together.

    A student turn ends at the environment's stop string (``</calc>``): the environment
    answers, its answer is appended as the samplers append it
    (``rollout.prompting.encode_environment_answer``: ``[`` + answer + ``]``) and the student
    goes on; EOS, a
    turn without a call, ``max_turns`` student turns or ``max_new_tokens`` student tokens end
    the episode. The answer is read from the student's own text (a tool's answer never
    supplies it), as in ``rollout.episodes``. The whole sequence is recomputed for every token (no KV cache: at these
    lengths and sizes that is simpler and fast enough); rows are right-padded, so each row's
    next token is read at its own last position.
    """
    model.eval()
    env_options = EnvironmentOptions(seed=0)
    envs = [make_environment(ENVIRONMENT, env_options) for _ in products]
    ids = [prompting.encode_prompt(tokenizer, p.prompt) for p in products]
    for env, p in zip(envs, products, strict=True):
        env.reset(p.problem())
    start = [len(r) for r in ids]
    turn, own = [""] * len(products), [""] * len(products)
    turns, calls, new = [0] * len(products), [0] * len(products), [0] * len(products)
    active = set(range(len(products)))
    eos = tokenizer.eos_token_id
    while active:
        rows = sorted(active)
        width = max(len(ids[i]) for i in rows)
        ids_BT = torch.tensor([ids[i] + [eos] * (width - len(ids[i])) for i in rows])
        logits_BTV = model(input_ids=ids_BT).logits
        last_B = torch.tensor([len(ids[i]) - 1 for i in rows])
        next_B = logits_BTV[torch.arange(len(rows)), last_B].argmax(-1).tolist()
        for i, tok in zip(rows, next_B, strict=True):
            ids[i].append(tok)
            new[i] += 1
            if tok == eos:
                active.discard(i)
                continue
            char = tokenizer.decode([tok])
            turn[i], own[i] = turn[i] + char, own[i] + char
            if any(turn[i].endswith(s) for s in envs[i].stop):
                step = envs[i].step(turn[i])
                exchanged = [Turn("assistant", turn[i])]
                ids[i] += prompting.encode_environment_answer(
                    tokenizer, products[i].prompt, exchanged, step.turns
                )
                turns[i], calls[i], turn[i] = turns[i] + 1, calls[i] + step.tool_calls, ""
                if step.done or turns[i] >= max_turns:
                    active.discard(i)
            if new[i] >= max_new_tokens:
                active.discard(i)
    model.train()
    texts = [
        tokenizer.decode(r[s:], skip_special_tokens=True) for r, s in zip(ids, start, strict=True)
    ]
    return [
        Episode(text, c, tasks.verify(mine, p.answer))
        for text, mine, c, p in zip(texts, own, calls, products, strict=True)
    ]


def episode_summary(episodes: list[Episode]) -> dict:
    """accuracy and tool_call_rate (episodes with at least one call) over ``episodes``."""
    n = len(episodes)
    return {
        "accuracy": sum(e.correct for e in episodes) / n,
        "tool_call_rate": sum(e.tool_calls > 0 for e in episodes) / n,
    }


def train_sft(
    model, tokenizer, spec: TrainSpec, *, mix: Mix, seed: int, train: list[Product]
) -> dict:
    """SFT on gold trajectories (the tool trajectory or the direct answer, by ``mix``), loss on
    the student's own tokens; early stop on the dev set's greedy
    episode accuracy (``spec.eval_every``, ``spec.stop_at_dev_acc``). Returns a small report."""
    rng = random.Random(f"toy_tool:{seed}")
    dev = dev_problems(train)
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98)
    )
    model.train()
    dev_acc, loss_ema, step = 0.0, None, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, spec.max_steps + 1):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step - 1, spec)
        rows = []
        for _ in range(spec.batch):
            p = rng.choice(train)
            draw = rng.random()
            tool = step <= mix.tool_steps or draw < mix.tool_share
            rows.append(
                _encode_example(tokenizer, p, p.tool_segments() if tool else p.direct_segments())
            )
        ids, mask, labels = _batch(rows, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if spec.eval_every and (step % spec.eval_every == 0 or step == spec.max_steps):
            dev_acc = episode_summary(greedy_episodes(model, tokenizer, dev))["accuracy"]
            if dev_acc >= spec.stop_at_dev_acc:
                break
    return {
        "steps": step,
        "final_loss": loss_ema,
        "dev_acc": dev_acc,
        "train_s": time.perf_counter() - start,
        "train_cpu_s": time.process_time() - cpu_start,
    }


def _payload(name: str, model: ModelSpec, train: TrainSpec, seed: int, mix: Mix):
    return {
        "name": name,
        "task": {"version": TASK_VERSION, "chars": VOCAB_CHARS, "low": LOW, "high": HIGH},
        "model": asdict(model),
        "train": asdict(train),
        "mix": asdict(mix),
        "seed": seed,
    }


def _parts(spec: ToolPairSpec, seed: int):
    return [
        ("teacher", spec.teacher, spec.teacher_train, seed, Mix()),
        ("student", spec.student, spec.student_train, seed + 1, spec.student_mix),
    ]


def toy_tool_cached(out_dir: Path, *, seed: int = 0, spec: ToolPairSpec = ToolPairSpec()) -> bool:
    """Whether ``build_toy_tool_models(out_dir, seed=seed, spec=spec)`` would only read the cache."""
    out_dir = Path(out_dir)
    models_cached = all(
        _cached(out_dir / name, _spec_hash(_payload(name, m, t, s, mix))) is not None
        for name, m, t, s, mix in _parts(spec, seed)
    )
    return models_cached and _data_current(out_dir / "data")


def _data_texts() -> dict[str, str]:
    train, heldout = split()

    def lines(products: list[Product]) -> str:
        return "".join(
            json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer}) + "\n"
            for p in products
        )

    return {"train.jsonl": lines(train), "heldout.jsonl": lines(heldout)}


def _data_current(folder: Path) -> bool:
    return all(
        (folder / name).is_file() and (folder / name).read_text() == text
        for name, text in _data_texts().items()
    )


def _write_data(folder: Path) -> None:
    """The problems as JSONL, rewritten (atomically) only when they differ."""
    with build_lock(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in _data_texts().items():
            path = folder / name
            if path.is_file() and path.read_text() == text:
                continue
            tmp = path.with_name(f".{name}.tmp{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(path)


def _build_one(folder: Path, name, model_spec, train_spec, seed, mix, *, force) -> dict:
    payload = _payload(name, model_spec, train_spec, seed, mix)
    spec_hash = _spec_hash(payload)
    with build_lock(folder):
        if not force and (info := _cached(folder, spec_hash)):
            return info
        with _one_torch_thread():
            return _train_and_save(folder, model_spec, train_spec, seed, mix, payload)


@contextlib.contextmanager
def _one_torch_thread():
    """At these sizes a second torch thread only adds synchronisation: the pair built in 42 s
    with one thread, 111 s with two (same bytes either way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_and_save(folder, model_spec, train_spec, seed, mix, payload) -> dict:
    tokenizer = build_tokenizer(VOCAB_CHARS)
    model = _new_model(model_spec, tokenizer, seed)
    train, heldout = split()
    report = train_sft(model, tokenizer, train_spec, mix=mix, seed=seed, train=train)
    report["heldout_hf"] = episode_summary(greedy_episodes(model, tokenizer, heldout))
    report["params"] = sum(p.numel() for p in model.parameters())
    info = {"spec_hash": _spec_hash(payload), "spec": payload, "report": report}
    save_model_folder(model, tokenizer, folder, info)
    return info


def build_toy_tool_models(
    out_dir: Path, *, seed: int = 0, force: bool = False, spec: ToolPairSpec = ToolPairSpec()
) -> ToolPair:
    """Build (or reuse) ``out_dir/{teacher,student}`` and the problems in ``out_dir/data``;
    the build reports (held-out greedy accuracy and tool-call rate) are in ``.report``."""
    out_dir = Path(out_dir)
    _write_data(out_dir / "data")
    infos = {
        name: _build_one(out_dir / name, name, m, t, s, mix, force=force)
        for name, m, t, s, mix in _parts(spec, seed)
    }
    return ToolPair(
        out_dir / "teacher",
        out_dir / "student",
        out_dir / "data" / "train.jsonl",
        out_dir / "data" / "heldout.jsonl",
        report={name: info["report"] for name, info in infos.items()},
    )


def heldout_report(folder: Path) -> dict:
    """Greedy held-out figures of the model in ``folder`` with the calculator in the loop
    (``greedy_episodes``): accuracy with its Wilson 95 % interval, and the tool-call rate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.accuracy import wilson_interval

    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, heldout = split()
    episodes = greedy_episodes(model, tokenizer, heldout)
    correct = sum(e.correct for e in episodes)
    return {
        "model": str(folder),
        "n": len(episodes),
        **episode_summary(episodes),
        "ci95": list(wilson_interval(correct, len(episodes))),
        "examples": [e.text for e in episodes[:3]],
    }


if __name__ == "__main__":  # python -m models.toy_tool FOLDER...: held-out figures as JSON
    import sys

    torch.set_num_threads(1)
    for arg in sys.argv[1:]:
        print(json.dumps(heldout_report(Path(arg))))
