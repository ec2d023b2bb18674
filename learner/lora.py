"""LoRA students (`learner.lora`): only low-rank adapters train; the samplers get merged weights.

Each targeted linear layer y = W x becomes, through peft,

    y = W x + (alpha / r) · B A dropout(x),    A: [r, in], B: [out, r], B = 0 at the start,

with W frozen, so step 0 is the base student exactly. What leaves the learner is the merged
student W' = W + (alpha / r)·B·A under the base model's own parameter names and shapes
(`merged_weights`): the samplers, evaluation and the exported `student/` folder need nothing
LoRA-specific. (vLLM's own adapter path was measured against this on the CPU build,
`bench/lora_serving.py`: the adapter is servable sooner, but sampling with it is 0.16x as fast on
the SmolLM2 student, so merged pushes stay.) Checkpoints hold the adapters and their optimizer state only (the frozen base
is the student folder the run starts from, a trained key); the final export adds the peft
adapter folder (`save_adapter`).

The output layer takes no adapter: the learner's chunked log-probs read its weight directly
(`learner.logprobs`). Targets are resolved against the student's modules before anything
starts (`resolve_targets`, `student_targets`): a name the student lacks is a `LoraTargetError`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from learner.settings import LoraSettings
from services.errors import UserError

ADAPTER = "default"  # peft's adapter name; one adapter per student
ADAPTER_FOLDER = "adapter"  # the peft adapter, inside the exported student folder
KEY = "learner.lora.target_modules"


class LoraTargetError(UserError, ValueError):
    """A `learner.lora.target_modules` entry names no linear layer the student has."""


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of names: the full module name, or a suffix after a dot.
    return name == target or name.endswith("." + target)


def _linear_names(model: torch.nn.Module) -> tuple[list[str], str | None]:
    """(names of the model's linear layers other than the output layer, the output layer's)."""
    head = model.get_output_embeddings()
    names, head_name = [], None
    for name, module in model.named_modules():
        if module is head:
            head_name = name
        elif isinstance(module, torch.nn.Linear):
            names.append(name)
    return names, head_name


def resolve_targets(
    model: torch.nn.Module, target_modules: list[str] | tuple[str, ...], *, where: str = ""
) -> tuple[str, ...]:
    """The full names of the linear layers `target_modules` selects (empty = all but the
    output layer). Each entry must select at least one: LoraTargetError naming the key and
    the student's linear layers otherwise. where: the student, for the message."""
    names, head = _linear_names(model)
    if not target_modules:
        return tuple(names)
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    of = f" ({where})" if where else ""
    chosen: list[str] = []
    for target in target_modules:
        if head is not None and _matches(head, target):
            raise LoraTargetError(
                f"{KEY}: {target!r} names the output layer {head!r} of the student{of}; it takes no "
                f"adapter (the learner's log-probs read its weight directly). Its other linear "
                f"layers: {', '.join(short)}"
            )
        found = [n for n in names if _matches(n, target)]
        if not found:
            raise LoraTargetError(
                f"{KEY}: the student{of} has no linear layer named {target!r}; its linear "
                f"layers are {', '.join(short)} (a name or a dotted suffix of one, e.g. "
                f"{names[0]!r})"
            )
        chosen += [n for n in found if n not in chosen]
    return tuple(n for n in names if n in chosen)  # in the model's order


def student_targets(model_dir: str | Path, target_modules: list[str]) -> tuple[str, ...]:
    """`resolve_targets` on the student folder's architecture, built on the meta device (no
    weights are read): the check that runs before any engine starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return resolve_targets(model, target_modules, where=str(model_dir))


def attach(model: torch.nn.Module, lora: LoraSettings):
    """Wrap `model` in a peft LoRA model (adapters injected into `model` itself, every base
    parameter frozen). Returns the `peft.PeftModel`; train `model` (the same modules)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        # empty: peft's every linear layer but the output layer, as resolve_targets reads it
        target_modules=list(lora.target_modules) or "all-linear",
        bias="none",
    )
    return get_peft_model(model, config, adapter_name=ADAPTER)


def _is_adapter(name: str) -> bool:
    return ".lora_" in name  # peft's lora_A / lora_B module dicts


def merged_weights(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(base parameter name, contiguous CPU float32 W + (alpha / r)·B·A) for every parameter
    of the base model, adapters merged into a copy (the weights in `model` are not touched).

    model: the HF model with adapters injected (`attach`), its parameters readable (gathered
    under ZeRO-3 by the caller). Names and shapes are the base model's `named_parameters()`.
    """
    from peft.tuners.lora import LoraLayer

    layers = {
        f"{name}.base_layer.weight": module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }
    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if _is_adapter(name):
                continue
            weight = p.detach().to("cpu", torch.float32, copy=True)
            if name in layers:
                weight += layers[name].get_delta_weight(ADAPTER).to("cpu", torch.float32)
            out.append((name.replace(".base_layer.", "."), weight.contiguous()))
    return out


def adapter_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors (CPU copies) under `model`'s parameter names (gathered by the
    caller under ZeRO-3)."""
    return {
        name: p.detach().to("cpu", copy=True)
        for name, p in model.named_parameters()
        if _is_adapter(name)
    }


def save_adapter(peft_model, path: str | Path, adapters: dict[str, torch.Tensor]) -> None:
    """Write the peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    `peft.PeftModel.from_pretrained(base, path)` loads. adapters: `adapter_weights`."""
    prefix = "base_model.model."  # peft's names for the wrapped model's parameters
    peft_model.save_pretrained(
        str(path),
        state_dict={prefix + k: v for k, v in adapters.items()},
        save_embedding_layers=False,
    )
