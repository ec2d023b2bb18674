"""The DeepSpeed training engine for the student (the only module that imports deepspeed).

One `LearnerEngine` is one data-parallel rank. Every rank holds a full model replica (ZeRO
0–2) or a shard of it (ZeRO 3) and receives a contiguous shard of the step's batch
(`learner.batch.split`). Each shard's loss is normalised by the GLOBAL token (or sequence)
count, so the shards' gradients sum to the full batch's gradient; DeepSpeed all-reduces
gradients as a MEAN over ranks, so each rank backpropagates world_size × its loss share.

Works on CPU (DeepSpeed's `cpu` accelerator, gloo collectives) and on CUDA. Process-level
distributed settings (MASTER_ADDR, ranks) are passed in by the caller; see
`services.learner_group`.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path

import deepspeed
import torch
from deepspeed import comm as ds_comm
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner import lora as lora_adapters
from learner import manifest
from learner.batch import TrainBatch
from learner.microbatch import padding_cells, plan_micro_batches
from learner.schedule import lr_factor
from learner.settings import LossSettings, OptimSettings
from learner.step import NonFiniteError, compute_loss, merge_metrics
from learner.teacher_head import load_teacher_head
from models.checks import tokenizer_length

# DeepSpeed 0.19 calls torch.distributed APIs that torch 2.13 deprecates, once per step; the
# warnings say nothing actionable and would flood the Ray logs.
warnings.filterwarnings(
    "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
)

PRECISIONS = ("auto", "bf16", "fp32")


# DeepSpeed JIT-loads its CPU communication op through torch's extension loader, which takes a
# lock file in the build folder on EVERY load (the no-op check takes well under a second; the
# first build about a minute). A process killed while holding it (a crashed or killed rank)
# leaves the file behind, and every later rank then waits on it forever.
_STALE_LOCK_S = 300.0


def clear_stale_build_lock(name: str = "deepspeed_shm_comm") -> bool:
    """Remove the op's build lock if it is older than any real build; True if one was removed."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < _STALE_LOCK_S:
        return False
    warnings.warn(f"removing a stale build lock {lock} ({age:.0f} s old)", stacklevel=2)
    lock.unlink(missing_ok=True)
    return True


def resolve_precision(precision: str) -> str:
    """Resolve "auto" to "bf16" on a CUDA device that supports it, else "fp32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


class LearnerEngine:
    """One DeepSpeed data-parallel rank training a Hugging Face causal LM.

    model_path: HF folder of the initial student (weights, config, maybe tokenizer).
    optim: `learner.settings.OptimSettings` (ZeRO stage, AdamW, schedule, clipping, precision,
        seed, micro-batch budget). loss: `learner.settings.LossSettings`, used by every step.
    rank, world_size, master_addr, master_port: the data-parallel group (every rank must be
        constructed concurrently: process-group set-up is a collective).
    """

    def __init__(
        self,
        *,
        model_path: str,
        optim: OptimSettings,
        loss: LossSettings,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
    ) -> None:
        self.model_path = model_path
        self.rank = rank
        self.world_size = world_size
        self.optim, self.loss_settings = optim, loss
        self.zero_stage = zero_stage = optim.zero_stage
        self.precision = resolve_precision(optim.precision)

        # DeepSpeed reads the process group from the environment (env:// rendezvous). On GPU the
        # actor sees exactly one device (CUDA_VISIBLE_DEVICES), so the local rank is always 0.
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
        )
        clear_stale_build_lock()
        deepspeed.init_distributed(verbose=False)
        torch.manual_seed(optim.seed)

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        # LoRA: adapters injected into `model`, the base frozen; only trainable params below.
        self.peft_model = lora_adapters.attach(model, optim.lora) if optim.lora else None
        # The log-softmax runs over the tokenizer's ids only: further rows of the output layer
        # are padding, sliced off as the samplers do (rollout/engine.py, docs/math.md).
        self.vocab_size = (
            tokenizer_length(model_path)
            if (Path(model_path) / "tokenizer.json").is_file()
            else None
        )
        # distill.teacher_topk = "full": the teacher's output layer, once per rank (float32,
        # the tokenizer's rows), applied to the batch's teacher hidden states in every step.
        self.teacher_head = (
            load_teacher_head(
                loss.teacher_head.teacher_path, vocab_size=self.vocab_size, dtype=torch.float32
            )
            if loss.teacher_head is not None
            else None
        )
        trained = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=optim.lr,
            betas=tuple(optim.betas),
        )

        def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(
                opt,
                lambda step: lr_factor(
                    step,
                    schedule=optim.lr_schedule,
                    warmup_steps=optim.warmup_steps,
                    total_steps=optim.total_steps,
                ),
            )

        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": optim.grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        self.device = self.engine.device
        if self.teacher_head is not None:
            self.teacher_head = self.teacher_head.to(self.device)
        self.last_load: manifest.Choice | None = None  # set by load_checkpoint
        self._norm_from_grads = zero_stage == 0 and self.precision == "fp32"

    # ------------------------------------------------------------------ training

    def train_step(self, batch: TrainBatch, *, normaliser: float) -> dict[str, float]:
        """Forward and backward per micro-batch, then one optimizer step on this rank's shard.

        normaliser: `learner.step.global_normaliser` of the whole step batch (all ranks); every
            micro-batch's loss is divided by it, so the micro-batches' gradients add up to the
            shard's and the shards' to the batch's. The loss and the micro-batch budget come
            from the settings given at construction.
        Returns the merged `StepStats.metrics()` of this shard's micro-batches (its
        `learner/loss` is this shard's share of the global loss) plus `learner/grad_norm`
        (global, before clipping), `learner/lr` (the lr this step used),
        `learner/step_time_s`, `learner/micro_batches`, `learner/cells` (B·T the forward passes
        processed) and `learner/padding_frac` (the padded share of those cells).
        """
        start = time.perf_counter()
        self.engine.train()
        lr = self.engine.get_lr()[0]
        batch = batch.to(self.device)
        micro_batch_tokens = self.optim.micro_batch_tokens
        micro = plan_micro_batches(batch, micro_batch_tokens)
        count = len(micro)
        if micro_batch_tokens and self.world_size > 1:
            # ZeRO-2/3 reduce gradients in every backward and ZeRO-3 gathers weights in every
            # forward: all ranks must run the same number of micro-batches.
            count = self._max_over_ranks(count)
            micro = plan_micro_batches(batch, micro_batch_tokens, min_count=count)
        # A rank with fewer rows than `count` repeats its first row with zero weight.
        passes = micro + [micro[0]] * (count - len(micro))
        per_micro = []
        for i, mb in enumerate(passes):
            self.engine.set_gradient_accumulation_boundary(i == count - 1)
            loss, stats = compute_loss(
                self.engine,
                mb,
                settings=self.loss_settings,
                normaliser=normaliser,
                vocab_size=self.vocab_size,
                teacher_head=self.teacher_head,
            )
            real = i < len(micro)
            # The all-reduce averages over ranks; the shards' loss shares must add, hence × world.
            self.engine.backward(loss * (self.world_size if real else 0.0))
            if real:
                per_micro.append(stats.metrics())
        # DeepSpeed reports the norm only from its ZeRO / bf16 optimizers; without them the
        # reduced gradients are still in .grad here (step() clears them).
        grads_norm = self._reduced_grad_norm() if self._norm_from_grads else None
        if grads_norm is not None and not math.isfinite(grads_norm):
            # Before step(): the weights stay as they were. (ZeRO and bf16 report the norm only
            # from inside step(); there LearnerGroup stops the run right after it.)
            self.engine.zero_grad()
            raise NonFiniteError(f"gradient norm = {grads_norm} (no optimizer step was taken)")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        metrics = merge_metrics(per_micro)
        cells, padded = padding_cells(micro)
        metrics["learner/grad_norm"] = float(norm if norm is not None else grads_norm)
        metrics["learner/lr"] = lr
        metrics["learner/micro_batches"] = float(count)
        metrics["learner/cells"] = float(cells)
        metrics["learner/padding_frac"] = padded / max(cells, 1)
        metrics["learner/step_time_s"] = time.perf_counter() - start
        return metrics

    def _adapter_names(self) -> list[str]:
        return [n for n, p in self.engine.module.named_parameters() if p.requires_grad]

    def _max_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        ds_comm.all_reduce(t, op=ds_comm.ReduceOp.MAX)
        return int(t.item())

    def _reduced_grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads).item()

    # ------------------------------------------------------------------ weights

    def export_weights(self) -> list[tuple[str, torch.Tensor]]:
        """(HF parameter name, contiguous CPU float32 tensor) for every parameter.

        Names are those of the HF model's `named_parameters()`, i.e. its checkpoint names (a
        tied lm_head appears once, as the embedding), which vLLM's `reload_weights` accepts.
        A LoRA student exports the base model's parameters with the adapters merged in
        (`learner.lora.merged_weights`): same names and shapes as without LoRA.
        Under ZeRO-3 the shards are gathered first: a collective, so every rank must call this.
        """
        return self._gathered(self._export)

    def _export(self, module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        if self.peft_model is not None:
            return lora_adapters.merged_weights(module)
        return [
            (name, p.detach().to("cpu", torch.float32, copy=True).contiguous())
            for name, p in module.named_parameters()
        ]

    def _gathered(self, read):
        """read(the HF module) with every parameter whole (gathered under ZeRO-3: collective)."""
        module = self.engine.module
        gather = deepspeed.zero.GatheredParameters(
            list(module.parameters()), modifier_rank=None, enabled=self.zero_stage == 3
        )
        with gather, torch.no_grad():
            return read(module)

    def save_hf(self, path: str | Path) -> None:
        """Write a plain HF folder (config, safetensors, tokenizer if the source had one).

        A LoRA student writes the merged model there and its peft adapter folder in
        `path/adapter` (`learner.lora.save_adapter`). Collective under ZeRO-3 (the weights are
        gathered); only rank 0 writes.
        """
        weights = dict(self.export_weights())
        adapters = self._gathered(lora_adapters.adapter_weights) if self.peft_model else None
        if self.rank != 0:
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.engine.module.save_pretrained(path, state_dict=weights)
        if adapters is not None:
            lora_adapters.save_adapter(
                self.peft_model, path / lora_adapters.ADAPTER_FOLDER, adapters
            )
        source = Path(self.model_path)
        if (source / "tokenizer_config.json").is_file() or (source / "tokenizer.json").is_file():
            AutoTokenizer.from_pretrained(source).save_pretrained(path)

    # ------------------------------------------------------------------ checkpoints

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (restored by `load_checkpoint`)."""
        return self.engine.global_steps

    def save_checkpoint(
        self, path: str | Path, client_state: dict, *, keep: int | None = None
    ) -> Path:
        """Save weights, optimizer and scheduler state as tag `step_<N>` under `path`.

        Crash-safe and durable: DeepSpeed writes into `<tag>.partial`; once every rank has
        finished, rank 0 fsyncs every file and folder in it, writes the manifest, renames it to
        `<tag>`, fsyncs `path`, and only then replaces `path/latest` (write, fsync, rename,
        fsync `path`). A crash or power loss at any point leaves `latest` naming the previous
        complete checkpoint. keep: afterwards keep the newest `keep` complete checkpoints up to
        `latest` and delete older ones and any `.partial` leftovers (`manifest.prune`).
        Collective: every rank must call it. Returns the checkpoint folder.
        """
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        root = Path(path)
        tag = manifest.tag_for(self.global_steps)
        final, partial = root / tag, root / f"{tag}{manifest.PARTIAL}"
        # Checked on every rank (a read of the shared folder), so that all ranks raise together
        # instead of the others waiting at the barrier for rank 0. A latest checkpoint that no
        # longer verifies (a resume fell back past it) is replaced, not protected.
        if final.exists() and manifest.read_latest(root) == tag and manifest.verifies(final):
            raise FileExistsError(f"checkpoint {final} exists and is the latest")
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            # Leftovers of saves that crashed before `latest` named them.
            for stale in [final, *root.glob(f"*{manifest.PARTIAL}")]:
                if stale.is_dir():
                    shutil.rmtree(stale)
        ds_comm.barrier()
        lora = {"lora_adapters": self._adapter_names()} if self.peft_model is not None else {}
        self.engine.save_checkpoint(
            str(root),
            tag=partial.name,
            client_state={"client": client_state, **lora},
            save_latest=False,
            # LoRA: the adapters (and their optimizer state); the frozen base is the student.
            exclude_frozen_parameters=self.peft_model is not None,
        )
        ds_comm.barrier()
        if self.rank == 0:
            manifest.fsync_tree(partial)  # every rank's files on disk before anything names them
            manifest.write(partial)  # hashes of every rank's files, checked before a load
            partial.rename(final)
            manifest.fsync_dir(root)
            manifest.write_latest(root, tag)
            if keep is not None:
                manifest.prune(root, keep)
        ds_comm.barrier()
        return final

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore the newest checkpoint under `path` that verifies; returns its client_state.

        Starts at the tag `path/latest` names (validated: a plain `step_<N>` in `path`) and
        falls back to older checkpoints when a folder is missing or fails its manifest;
        `self.last_load` (a `manifest.Choice`) says which was loaded and what was skipped and
        why. Every rank must choose the same tag (checked). Call on a freshly built engine
        (DeepSpeed cannot load into a ZeRO-3 engine that has already saved). Collective.
        """
        root = Path(path)
        choice = manifest.choose(root)  # verified before DeepSpeed unpickles anything in it
        step = manifest.tag_step(choice.tag)
        if self.world_size > 1 and (
            self._max_over_ranks(step) != step or -self._max_over_ranks(-step) != step
        ):
            raise manifest.CheckpointIntegrityError(
                f"learner ranks chose different checkpoints in {root} (rank {self.rank}: "
                f"{choice.tag}); is {root} the same folder on every node?"
            )
        load_path, state = self.engine.load_checkpoint(
            str(root), tag=choice.tag, load_module_strict=self.peft_model is None
        )
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {root / choice.tag}")
        # Loaded non-strictly (the frozen base is not in it): the adapters must all be there.
        if self.peft_model is not None and state.get("lora_adapters") != self._adapter_names():
            raise manifest.CheckpointIntegrityError(
                f"{root / choice.tag} does not hold this LoRA student's adapters (a checkpoint "
                f"of another learner.lora, or of full fine-tuning)"
            )
        self.last_load = choice
        return state["client"]
