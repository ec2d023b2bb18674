"""Toy teacher/student models for the built-in arithmetic task, built here from scratch.

No model hub is reachable, so tests and the demo train their own: a character-level tokenizer
and small ``LlamaForCausalLM`` models saved as standard Hugging Face folders (config,
safetensors, tokenizer, generation config) that load in transformers and in vLLM-CPU.

* teacher: trained on gold worked solutions until it solves >= 90 % of the held-out set greedily.
* student: smaller, same tokenizer, warm-started by a short SFT on gold solutions and stopped
  early (at ~20 % on a dev set) so on-policy distillation has a lot of room to improve it.

Builds are deterministic (seeded; bit-identical on rebuild, with one torch thread or two) and
cached: the folder holds a hash of the spec and the code version, and a second call with the
same spec returns at once.

Measured with the default ``ToySpec`` (2 shared cores, 2026-11-29), held-out greedy accuracy
through vLLM: teacher 1.05 M params, 450 steps, 0.965; student 0.45 M params, 140 steps,
0.295 (300 more SFT steps take it to 1.0, so the gap is capacity-free). Build: 5.4 min on a
lightly loaded machine, 23 min when another job held a core. bf16 autocast gave no speed-up at
these sizes (teacher step, batch 128: fp32 0.30 s, bf16 0.35 s), so it is off. Under CPU
contention one torch thread ran the steps 2.5-3x faster than two.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from learner.schedule import lr_at
from models.common import BUILD_MARKER, BUILDER_VERSION, build_lock, save_model_folder
from rollout import prompting, tasks

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "unk_token": "<unk>",
}
VOCAB_CHARS = tasks.TASK_CHARS + " "
MAX_POSITIONS = 256  # comfortably above prompt (<= 9) + completion (<= 32) tokens
DEV_SEED = 4_242  # dev problems for early stopping: never the held-out set


@dataclass(frozen=True)
class ModelSpec:
    """Llama shape. head_dim = hidden / heads; vLLM-CPU attention wants 32, 64, 80, 96, 112, 128..."""

    hidden: int
    layers: int
    heads: int
    ffn: int


@dataclass(frozen=True)
class TrainSpec:
    """SFT on gold completions (loss on completion tokens only), AdamW with warmup + cosine decay.

    Training stops at ``max_steps`` or at the first dev evaluation (every ``eval_every`` steps;
    0 = never) reaching ``stop_at_dev_acc``.
    """

    max_steps: int
    batch: int
    lr: float
    warmup: int = 20
    eval_every: int = 50
    stop_at_dev_acc: float = 1.01  # > 1: never stop early
    weight_decay: float = 0.01
    bf16: bool = False  # bf16 autocast: no faster at these sizes on this CPU (measured), so off


@dataclass(frozen=True)
class ToySpec:
    teacher: ModelSpec = ModelSpec(hidden=128, layers=4, heads=4, ffn=512)
    teacher_train: TrainSpec = TrainSpec(max_steps=1500, batch=128, lr=3e-3, stop_at_dev_acc=0.98)
    student: ModelSpec = ModelSpec(hidden=96, layers=3, heads=3, ffn=384)
    student_train: TrainSpec = TrainSpec(
        max_steps=400, batch=64, lr=2e-3, eval_every=10, stop_at_dev_acc=0.2
    )


@dataclass(frozen=True)
class ToyModels:
    teacher_dir: Path
    student_dir: Path
    report: dict = field(default_factory=dict, compare=False)


def build_tokenizer(chars: str = VOCAB_CHARS):
    """Character-level fast tokenizer: one token per character of ``chars`` (ids in that order,
    after the specials ``<pad> <bos> <eos> <unk>``)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS.values())}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)


def _spec_hash(payload: dict) -> str:
    blob = json.dumps({"builder": BUILDER_VERSION, **payload}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cached(folder: Path, spec_hash: str) -> dict | None:
    marker = folder / BUILD_MARKER
    if not marker.is_file():
        return None
    info = json.loads(marker.read_text())
    return info if info.get("spec_hash") == spec_hash else None


def _new_model(spec: ModelSpec, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.hidden % spec.heads:
        raise ValueError(f"hidden {spec.hidden} is not divisible by heads {spec.heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.ffn,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _batch(
    problems: list[tasks.Arithmetic], tokenizer
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``[BOS] prompt completion [EOS]``: input_ids_BT, attention_mask_BT, labels_BT.

    Labels are -100 on BOS, the prompt and padding: the prompt's digits are random, so learning
    to predict them would only spend capacity.
    """
    rows, label_rows = [], []
    for p in problems:
        prompt = prompting.encode_prompt(tokenizer, p.prompt)
        completion = tokenizer.encode(p.completion(), add_special_tokens=False) + [
            tokenizer.eos_token_id
        ]
        rows.append(prompt + completion)
        label_rows.append([-100] * len(prompt) + completion)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, lab) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(row)] = 1
    return ids, mask, labels


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[tasks.Arithmetic], batch: int = 200) -> float:
    """Fraction of ``problems`` solved by greedy decoding with transformers (builder reports only;
    the project's evaluation goes through vLLM in ``rollout/accuracy.py``)."""
    model.eval()
    correct = 0
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        prompts = [prompting.encode_prompt(tokenizer, p.prompt) for p in chunk]
        width = max(map(len, prompts))
        # Left padding so every row's next token is generated at the same column.
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in prompts])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompts])
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=len(tasks.Arithmetic(999, 999, "+").completion()) + 1,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        correct += sum(tasks.verify(t, p.answer) for t, p in zip(texts, chunk, strict=True))
    model.train()
    return correct / len(problems)


def _lr_at(step: int, spec: TrainSpec) -> float:
    # Cosine to a floor of 10 % of the peak after the warm-up.
    return lr_at(
        step,
        peak_lr=spec.lr,
        schedule="cosine",
        warmup_steps=spec.warmup,
        total_steps=spec.max_steps,
        min_ratio=0.1,
    )


def train_sft(
    model, tokenizer, spec: TrainSpec, *, seed: int, desc: str, progress: bool = True
) -> dict:
    """Train ``model`` in place on gold worked solutions; returns a small report."""
    gen = tasks.ArithmeticGenerator(seed=seed)
    dev_gen = tasks.ArithmeticGenerator(seed=DEV_SEED)
    dev = [dev_gen.next() for _ in range(tasks.EVAL_SIZE)]
    opt = torch.optim.AdamW(
        model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98)
    )
    model.train()
    dev_acc, loss_ema, step = 0.0, None, 0
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=spec.max_steps, desc=desc, disable=not progress, leave=False)
    for step in range(1, spec.max_steps + 1):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step - 1, spec)
        ids, mask, labels = _batch([gen.next() for _ in range(spec.batch)], tokenizer)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if spec.eval_every and (step % spec.eval_every == 0 or step == spec.max_steps):
            dev_acc = greedy_accuracy(model, tokenizer, dev)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", dev_acc=f"{dev_acc:.2f}")
        if dev_acc >= spec.stop_at_dev_acc:
            break
    bar.close()
    return {
        "steps": step,
        "final_loss": loss_ema,
        "dev_acc": dev_acc,
        "train_s": time.perf_counter() - start,
        "train_cpu_s": time.process_time() - cpu_start,
    }


def _payload(name: str, model_spec: ModelSpec, train_spec: TrainSpec, seed: int) -> dict:
    return {"name": name, "model": asdict(model_spec), "train": asdict(train_spec), "seed": seed}


def toy_models_cached(out_dir: Path, *, seed: int = 0, spec: ToySpec = ToySpec()) -> bool:
    """Whether ``build_toy_models(out_dir, seed=seed, spec=spec)`` would only read the cache."""
    parts = [
        ("teacher", spec.teacher, spec.teacher_train, seed),
        ("student", spec.student, spec.student_train, seed + 1),
    ]
    return all(
        _cached(Path(out_dir) / name, _spec_hash(_payload(name, m, t, s))) is not None
        for name, m, t, s in parts
    )


def _build_one(
    folder: Path,
    model_spec: ModelSpec,
    train_spec: TrainSpec,
    *,
    seed: int,
    name: str,
    force: bool,
    progress: bool,
    heldout: bool = True,
) -> dict:
    payload = _payload(name, model_spec, train_spec, seed)
    spec_hash = _spec_hash(payload)
    with build_lock(folder):
        if not force and (info := _cached(folder, spec_hash)):
            return info
        return _train_and_save(
            folder,
            model_spec,
            train_spec,
            payload,
            spec_hash,
            seed=seed,
            name=name,
            progress=progress,
            heldout=heldout,
        )


def _train_and_save(
    folder, model_spec, train_spec, payload, spec_hash, *, seed, name, progress, heldout
) -> dict:
    tokenizer = build_tokenizer()
    model = _new_model(model_spec, tokenizer, seed)
    report = train_sft(
        model, tokenizer, train_spec, seed=seed, desc=f"train {name}", progress=progress
    )
    if heldout:
        report["heldout_greedy_acc_hf"] = greedy_accuracy(model, tokenizer, tasks.eval_problems())
    report["params"] = sum(p.numel() for p in model.parameters())
    info = {"spec_hash": spec_hash, "spec": payload, "report": report}
    save_model_folder(model, tokenizer, folder, info)
    return info


def build_toy_models(
    out_dir: Path,
    *,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    spec: ToySpec = ToySpec(),
) -> ToyModels:
    """Build (or reuse) ``out_dir/teacher`` and ``out_dir/student``; report accuracies in ``.report``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = _build_one(
        out_dir / "teacher",
        spec.teacher,
        spec.teacher_train,
        seed=seed,
        name="teacher",
        force=force,
        progress=progress,
    )
    student = _build_one(
        out_dir / "student",
        spec.student,
        spec.student_train,
        seed=seed + 1,
        name="student",
        force=force,
        progress=progress,
    )
    return ToyModels(
        out_dir / "teacher",
        out_dir / "student",
        report={"teacher": teacher["report"], "student": student["report"]},
    )


def build_tiny_model(
    out_dir: Path,
    *,
    steps: int = 30,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
    spec: ModelSpec = ModelSpec(hidden=64, layers=2, heads=2, ffn=128),
) -> Path:
    """A barely-trained tiny model (seconds to build) with the toy tokenizer, for fast tests."""
    train = TrainSpec(max_steps=steps, batch=32, lr=3e-3, warmup=5, eval_every=0)
    _build_one(
        Path(out_dir),
        spec,
        train,
        seed=seed,
        name="tiny",
        force=force,
        progress=progress,
        heldout=False,
    )
    return Path(out_dir)
