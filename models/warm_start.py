"""Supervised starts for a real-weights pair: task-tune a teacher, warm-start a student.

Two uses of one SFT routine (loss on completion tokens only, EOS included):

* ``tune_teacher``: fine-tune a model on gold completions of a task. SmolLM2-135M-Instruct does
  not follow an answer format a verifier can read (asked for ``#<answer>`` it answers
  "25 + 49 = 72" or "#11"; measured 0 % on 30 two-number sums), so the pair's teacher is the
  instruct model after a short SFT on the task.
* ``warm_start``: sequence-level distillation (Kim & Rush 2016), the usual start before
  on-policy distillation: sample the teacher on training prompts and fine-tune the student on
  its completions,

      L(θ) = − Σ_i Σ_{t ∈ completion_i} log π_θ(y_t | x_i, y_<t) / Σ_i |completion_i|,

  stopping early once a dev accuracy is reached, so that on-policy distillation has room left.

Only training prompts are used (``JsonlSource.next_batch`` never returns a held-out evaluation
prompt); the dev prompts for early stopping are further training prompts, never the eval set.

Deterministic and cached like ``models/toy.py``: seeded sampling and SFT, and a build marker
holding a hash of the spec, the task file, the source models' markers and ``BUILDER_VERSION``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from learner.schedule import lr_at
from models.common import BUILD_MARKER, BUILDER_VERSION, build_lock, save_model_folder
from rollout import tasks

# --- the task -------------------------------------------------------------------------------

COPY_PROMPT = "Repeat the words: {words}\nRespond in the format: #<answer>"
WORDS = tuple(
    """apple river stone house green table paper music horse water light cloud bread chair
    money night smile train sugar plant dream glass heart ocean tiger lemon piano beach
    grape snake queen knife brush candy shirt sheep radio truck bottle garden winter summer
    forest castle rabbit pencil window butter silver orange yellow purple monkey basket
    doctor farmer bridge market planet rocket island jacket circle animal flower mirror
    button cookie dragon violin spider camera puzzle hammer ladder pillow carpet wallet
    turtle parrot cherry potato tomato carrot onion pepper cheese coffee cotton
    wood fire bird fish milk rain snow wind moon star tree leaf rock sand lake road door
    book lamp ring boat ship king cake bell coat shoe hand foot song game gold iron salt""".split()  # noqa: SIM905
)


def copy_records(n: int = 4000, *, seed: int = 0, n_words: int = 4) -> list[dict]:
    """``n`` distinct prompts "repeat the words: w1 .. wk" (words from ``WORDS``, no repeats
    within a prompt), answer "w1 .. wk", as JSONL task records (``{"id", "prompt", "answer"}``;
    scored by the built-in ``#`` answer marker).

    A copying task because it is the one this teacher learns in a few CPU steps: tuned for 24
    steps on reversing three words it reached 3 % (it mostly copied them in order), on sums
    of two numbers up to 99, 6 %."""
    rng = random.Random(f"copy:{seed}:{n_words}")
    seen: set[tuple[str, ...]] = set()
    out = []
    while len(out) < n:
        words = tuple(rng.sample(WORDS, n_words))
        if words in seen:
            continue
        seen.add(words)
        text = " ".join(words)
        out.append(
            {"id": f"copy{len(out)}", "prompt": COPY_PROMPT.format(words=text), "answer": text}
        )
    return out


def write_copy_task(path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in copy_records(**kwargs)))
    return path


# --- SFT ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SftSpec:
    """AdamW SFT, cosine from ``lr`` (after ``warmup`` steps) to 10 % of it.

    train_from_layer: decoder layers below this index, and the (tied) embeddings, stay frozen
    when > 0 (their backward pass is skipped: the teacher tune costs about half a full step).
    stop_at_dev_acc: stop at the first dev evaluation (every ``eval_every`` steps) reaching it.
    bf16: bfloat16 autocast, float32 master weights. threads: torch threads while training (0:
    one per core).
    """

    steps: int
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    train_from_layer: int = 0
    eval_every: int = 0
    stop_at_dev_acc: float = 1.01
    bf16: bool = True
    seed: int = 0
    threads: int = 1


def _batch(examples: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt completion``: input_ids_BT, attention_mask_BT, labels_BT (-100
    except on completion tokens)."""
    rows = [e["prompt_ids"] + e["completion_ids"] for e in examples]
    width = max(map(len, rows))
    ids_BT = torch.full((len(rows), width), pad_id)
    labels_BT = torch.full((len(rows), width), -100)
    mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, e) in enumerate(zip(rows, examples, strict=True)):
        ids_BT[i, : len(row)] = torch.tensor(row)
        labels_BT[i, len(e["prompt_ids"]) : len(row)] = torch.tensor(e["completion_ids"])
        mask_BT[i, : len(row)] = 1
    return ids_BT, mask_BT, labels_BT


def completion_nll(model, ids_BT, mask_BT, labels_BT) -> torch.Tensor:
    """Mean −log p of the labelled tokens. The output layer runs only at the N labelled
    positions (hidden_ND → logits_NV), not at all B·T: with a 49k vocabulary and a 4-token
    answer after a 50-token prompt that is most of the step's cost saved."""
    hidden_BTD = model.model(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state
    target_BT = labels_BT[:, 1:]
    keep_BT = target_BT != -100
    hidden_ND = hidden_BTD[:, :-1][keep_BT]
    logits_NV = model.lm_head(hidden_ND)
    logits_NV = logits_NV.to(torch.promote_types(logits_NV.dtype, torch.float32))  # bf16 → fp32
    return torch.nn.functional.cross_entropy(logits_NV, target_BT[keep_BT])


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems, *, max_new_tokens: int, batch: int = 128) -> float:
    """Fraction of ``problems`` (``rollout.sources.Problem``) solved by greedy decoding in
    transformers (builder reports and early stopping only; evaluation proper goes through vLLM)."""
    from rollout.prompting import encode_prompt

    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        prompts = [encode_prompt(tokenizer, p.prompt) for p in chunk]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompts])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        correct += sum(tasks.verify(t, p.answer) for t, p in zip(texts, chunk, strict=True))
    model.train(was_training)
    return correct / max(1, len(problems))


def sft(
    model,
    examples: list[dict],
    spec: SftSpec,
    *,
    pad_id: int,
    dev_acc: Callable[[], float] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``model`` in place on ``examples`` (``prompt_ids``, ``completion_ids``)."""
    torch.manual_seed(spec.seed)
    rng = random.Random(spec.seed)
    if spec.train_from_layer > 0:
        model.model.embed_tokens.requires_grad_(False)
        for layer in model.model.layers[: spec.train_from_layer]:
            layer.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    model.train()
    order: list[int] = []
    loss_ema, acc, step, t0 = None, None, 0, time.perf_counter()
    for step in range(1, spec.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(
                step - 1,
                peak_lr=spec.lr,
                schedule="cosine",
                warmup_steps=spec.warmup,
                total_steps=spec.steps,
                min_ratio=0.1,
            )
        if len(order) < spec.batch:  # a fresh seeded shuffle every epoch
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        chunk, order = order[: spec.batch], order[spec.batch :]
        ids_BT, mask_BT, labels_BT = _batch([examples[i] for i in chunk], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            loss = completion_nll(model, ids_BT, mask_BT, labels_BT)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        evaluate = dev_acc is not None and spec.eval_every and step % spec.eval_every == 0
        if evaluate:
            acc = dev_acc()
        if step % 10 == 0 or evaluate:
            log(f"sft step {step}/{spec.steps} loss {loss_ema:.3f} dev_acc {acc} "
                f"{time.perf_counter() - t0:.0f}s")  # fmt: skip
        if acc is not None and acc >= spec.stop_at_dev_acc:
            break
    model.requires_grad_(True)
    return {
        "steps": step,
        "final_loss": loss_ema,
        "dev_acc": acc,
        "train_s": time.perf_counter() - t0,
    }


# --- cached builds --------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneSpec:
    """One supervised build: which completions (``data``: "gold" answers of the task, or the
    "teacher"'s greedy completions), on how many training prompts, then ``sft``.

    n_dev: further training prompts used for early stopping. max_tokens: longest completion
    sampled from the teacher (and the dev evaluation's limit).
    """

    data: str
    n_prompts: int
    sft: SftSpec
    n_dev: int = 100
    max_tokens: int = 16


def _hash(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _marker(folder: Path) -> dict:
    return json.loads((folder / BUILD_MARKER).read_text())


def gold_examples(tokenizer, problems) -> list[dict]:
    """``#<answer>`` + EOS after each prompt."""
    from rollout.prompting import encode_prompt

    return [
        {
            "prompt_ids": encode_prompt(tokenizer, p.prompt),
            "completion_ids": tokenizer.encode(f"#{p.answer}", add_special_tokens=False)
            + [tokenizer.eos_token_id],
        }
        for p in problems
    ]


def teacher_examples(teacher_dir: Path, tokenizer, problems, *, max_tokens: int, seed: int):
    """The teacher's greedy completions (vLLM, bf16) of ``problems``, as SFT examples, plus
    the teacher's accuracy on them. Completions cut at ``max_tokens`` are dropped."""
    from rollout.engine import EngineSettings, StudentEngine
    from rollout.prompting import encode_prompt

    prompt_ids = [encode_prompt(tokenizer, p.prompt) for p in problems]
    engine = StudentEngine(
        EngineSettings(
            model_path=str(teacher_dir),
            dtype="bfloat16",
            seed=seed,
            kv_cache_mb=512,
            max_model_len=max(map(len, prompt_ids)) + max_tokens + 1,
        )
    )
    try:
        gens = engine.generate(prompt_ids, max_tokens=max_tokens, temperature=0.0)
    finally:
        engine.close()
    examples, correct = [], 0
    for problem, ids, [g] in zip(problems, prompt_ids, gens, strict=True):
        text = tokenizer.decode(g.token_ids, skip_special_tokens=True)
        correct += tasks.verify(text, problem.answer)
        if g.finish_reason == "stop":
            examples.append({"prompt_ids": ids, "completion_ids": list(g.token_ids)})
    return examples, correct / len(problems)


def build_tuned(
    folder: Path,
    base_dir: Path,
    task_path: Path,
    spec: TuneSpec,
    *,
    teacher_dir: Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Build (or reuse) ``folder``: the model in ``base_dir`` after ``spec``'s SFT on the JSONL
    task at ``task_path``. Returns the build marker (``spec_hash``, ``spec``, ``report``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.sources import make_source

    if spec.data not in ("gold", "teacher"):
        raise ValueError(f"unknown SFT data {spec.data!r}; expected 'gold' or 'teacher'")
    if spec.data == "teacher" and teacher_dir is None:
        raise ValueError("SFT on teacher completions needs teacher_dir")
    folder, base_dir, task_path = Path(folder), Path(base_dir), Path(task_path)
    payload = {
        "builder": BUILDER_VERSION,
        "tune": asdict(spec),
        "task_sha256": hashlib.sha256(task_path.read_bytes()).hexdigest(),
        "base": _marker(base_dir),
        "teacher": _marker(teacher_dir) if spec.data == "teacher" else None,
    }
    spec_hash = _hash(payload)
    with build_lock(folder):
        if not force and (folder / BUILD_MARKER).is_file():
            info = _marker(folder)
            if info.get("spec_hash") == spec_hash:
                return info
        t0 = time.perf_counter()
        # Seed 0 holds out the same eval set as a run with run.seed = 0 (the default) and
        # `opdplus eval`: those prompts are never trained on.
        source = make_source("jsonl", path=task_path, seed=0, max_prompt_chars=4096)
        train = source.next_batch(spec.n_prompts)
        dev = source.next_batch(spec.n_dev)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        report: dict = {}
        if spec.data == "gold":
            examples = gold_examples(tokenizer, train)
        else:
            examples, report["teacher_train_acc"] = teacher_examples(
                teacher_dir, tokenizer, train, max_tokens=spec.max_tokens, seed=spec.sft.seed
            )
            report["sample_s"] = time.perf_counter() - t0
            log(f"{len(examples)} teacher completions in {report['sample_s']:.0f}s")
        threads = torch.get_num_threads()
        torch.set_num_threads(spec.sft.threads or os.cpu_count() or 1)
        try:
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            report["dev_acc_before"] = greedy_accuracy(
                model, tokenizer, dev, max_new_tokens=spec.max_tokens
            )
            report.update(
                sft(
                    model,
                    examples,
                    spec.sft,
                    pad_id=tokenizer.pad_token_id,
                    dev_acc=lambda: greedy_accuracy(
                        model, tokenizer, dev, max_new_tokens=spec.max_tokens
                    ),
                    log=log,
                )
            )
            if report["dev_acc"] is None:
                report["dev_acc"] = greedy_accuracy(
                    model, tokenizer, dev, max_new_tokens=spec.max_tokens
                )
        finally:
            torch.set_num_threads(threads)
        report.update(examples=len(examples), total_s=time.perf_counter() - t0)
        log(f"built {folder.name}: {report}")
        info = {
            "spec_hash": spec_hash,
            "spec": {**_marker(base_dir).get("spec", {}), "tune": asdict(spec)},
            "report": report,
        }
        # rope_theta must stay explicit (see models/smollm2.py): copy it from the base config.
        config = json.loads((base_dir / "config.json").read_text())
        overrides = {"rope_theta": config["rope_theta"]} if "rope_theta" in config else None
        save_model_folder(model, tokenizer, folder, info, config_overrides=overrides)
        return info
