"""The teacher's output layer in the learner: teacher hidden states → teacher log-probs.

The scorers can return the teacher's final hidden states h_T (after the final norm) at the
response positions instead of log-prob lists. The learner loads only the teacher's output layer
W_T (`load_teacher_head`: `lm_head.weight`, or the input embedding when the teacher ties them,
read from the folder's safetensors without building the model) and forms

    log π_T(·|s) = log softmax(W_T[:V] h_T / τ_T)

chunk by chunk over positions, never more than [chunk, V] at once: the sampled token's
log-prob and any top-K (no cap on K) (`teacher_logprobs`, `teacher_fields`), or, for
`distill.teacher_topk = "full"`, the exact per-position D_f of the student against it with the
student's own output layer (`full_vocab_logprobs`, `full_batch_loss`; the maths in
`learner.dense`, docs/math.md §8 "The full vocabulary").

Layout (as the teacher's top-K in `learner.batch.TrainBatch`): teacher_hidden_BTH[b, i] is the
hidden state whose logits give π_T(· | x_<i), i.e. the teacher's output at position i − 1, at
response columns; other columns are ignored. V is the tokenizer's length: an output layer padded
beyond it is cut to its first V rows, as every other softmax in the project (docs/math.md §6).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from learner.dense import (
    DenseStats,
    full_dense_surrogate_loss,
    full_vocab_terms,
    head_log_softmax,
)
from learner.divergences import Divergence
from learner.logprobs import (
    DEFAULT_CHUNK_SIZE,
    _call_as_forward,
    _output_layer,
    _real_rows,
    place_selected,
    selected_hidden,
)
from services.errors import UserError

# The full-vocabulary pass holds about twelve [chunk, V] float32 buffers at its peak (both
# log-softmaxes, ell, p, the cost's and f''s temporaries; measured 2.3 MiB per position at
# V = 49,152) where the sampled / top-K head holds one or two; it runs on chunk_size //
# FULL_CHUNK_DIVISOR positions at a time so that its step peaks below the top-8 step's at the
# same learner.logprob_chunk (SmolLM2, 16 x 64, chunk 512: 979 vs 1,002 MiB;
# bench/learner.py --signal).
FULL_CHUNK_DIVISOR = 16
_HEAD_SUFFIX = "lm_head.weight"
_EMBED_SUFFIX = "embed_tokens.weight"


class TeacherHeadError(UserError, ValueError):
    """The teacher folder has no usable output layer; the message names the folder and key."""


@dataclass(frozen=True)
class TeacherHead:
    """The teacher's output layer, cut to the tokenizer's rows.

    weight_VH: [V, H] rows [0, V) of the output layer. folder: where it was read from; key: the
    safetensors tensor it came from; rows: the layer's rows in the folder (≥ V).
    """

    weight_VH: Tensor
    folder: str
    key: str
    rows: int

    @property
    def vocab_size(self) -> int:
        return self.weight_VH.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight_VH.shape[1]

    def to(self, device: torch.device | str) -> TeacherHead:
        return TeacherHead(self.weight_VH.to(device), self.folder, self.key, self.rows)


def load_teacher_head(
    folder: str | Path,
    *,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TeacherHead:
    """Read the teacher's output layer from an HF model folder without instantiating the model.

    The tensor is `*lm_head.weight`, or `*embed_tokens.weight` when config.json (or its
    text_config) sets tie_word_embeddings (or leaves it unset and the files have no head),
    found in model.safetensors or through model.safetensors.index.json (sharded). Only its
    first `vocab_size` rows are read (None: all). Raises TeacherHeadError (a UserError) naming
    the folder and the key when the folder, its config, its weights or the tensor is missing,
    or when vocab_size exceeds the layer's rows.
    """
    from safetensors import safe_open

    root = Path(folder)
    tied = _tied(root)
    files = _weight_files(root)
    key = _head_key(root, files, tied)
    with safe_open(str(root / files[key]), framework="pt", device=str(device)) as f:
        rows_slice = f.get_slice(key)
        shape = rows_slice.get_shape()
        if len(shape) != 2:
            raise TeacherHeadError(f"{root}: tensor {key!r} has shape {shape}, expected [V, H]")
        rows = int(shape[0])
        if vocab_size is not None and not 0 < vocab_size <= rows:
            raise TeacherHeadError(
                f"{root}: the output layer {key!r} has {rows} rows, fewer than the tokenizer's "
                f"{vocab_size} ids"
            )
        weight = rows_slice[: rows if vocab_size is None else vocab_size]
    return TeacherHead(weight.to(dtype).contiguous(), str(root), key, rows)


def _tied(root: Path) -> bool | None:
    path = root / "config.json"
    if not path.is_file():
        raise TeacherHeadError(f"teacher folder {root} has no config.json")
    config = json.loads(path.read_text())
    for cfg in (config, config.get("text_config") or {}):
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
    return None


def _weight_files(root: Path) -> dict[str, str]:
    """{tensor key: file name} over the folder's safetensors (single file or sharded index)."""
    from safetensors import safe_open

    index = root / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = root / "model.safetensors"
    if not single.is_file():
        raise TeacherHeadError(
            f"teacher folder {root} has neither model.safetensors nor "
            "model.safetensors.index.json (the output layer is read from safetensors only)"
        )
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), single.name)


def _head_key(root: Path, files: dict[str, str], tied: bool | None) -> str:
    def one(suffix: str) -> str | None:
        found = sorted(k for k in files if k == suffix or k.endswith("." + suffix))
        if len(found) > 1:
            raise TeacherHeadError(f"{root}: several tensors end in {suffix!r}: {found}")
        return found[0] if found else None

    head, embed = one(_HEAD_SUFFIX), one(_EMBED_SUFFIX)
    if tied is True or (tied is None and head is None):
        if embed is None:
            raise TeacherHeadError(
                f"{root}: the teacher ties its output layer to the input embedding, but its "
                f"safetensors hold no tensor {_EMBED_SUFFIX!r}"
            )
        return embed
    if head is None:
        raise TeacherHeadError(
            f"{root}: config.json sets tie_word_embeddings = false, but its safetensors hold no "
            f"tensor {_HEAD_SUFFIX!r}"
        )
    return head


# --------------------------------------------------------------------- teacher log-probs


@dataclass(frozen=True)
class TeacherLogprobs:
    """What `teacher_logprobs` computed, per position n (float32, no gradient).

    sampled_N: [N] log π_T(target_n | s_n), or None. topk_ids_NK / topk_logp_NK: [N, K] the
    teacher's top-K ids (largest first) and their log-probs, or None.
    """

    sampled_N: Tensor | None
    topk_ids_NK: Tensor | None
    topk_logp_NK: Tensor | None


@torch.no_grad()
def teacher_logprobs(
    head: TeacherHead,
    hidden_NH: Tensor,
    *,
    targets_N: Tensor | None = None,
    topk: int = 0,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK_SIZE,
) -> TeacherLogprobs:
    """The teacher's log-probs from its hidden states [N, H], chunk by chunk over positions.

    targets_N: [N] token ids (< V) whose log-probs are wanted (the sampled tokens), or None.
    topk: K ≥ 0, any K ≤ V (no cap). temperature: τ_T, π_T = softmax(W_T h / τ_T).
    """
    if hidden_NH.dim() != 2 or hidden_NH.shape[1] != head.hidden_size:
        raise ValueError(
            f"teacher hidden states {tuple(hidden_NH.shape)}, expected [N, {head.hidden_size}]"
        )
    if not 0 <= topk <= head.vocab_size:
        raise ValueError(f"topk must be in [0, {head.vocab_size}], got {topk}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    N, V = hidden_NH.shape[0], head.vocab_size
    if (
        targets_N is not None
        and targets_N.numel()
        and not 0 <= int(targets_N.min()) <= int(targets_N.max()) < V
    ):
        raise ValueError(f"target ids outside the teacher's vocabulary of {V}")
    out = dict(sampled_N=None, topk_ids_NK=None, topk_logp_NK=None)
    dev = hidden_NH.device
    if targets_N is not None:
        out["sampled_N"] = torch.empty(N, dtype=torch.float32, device=dev)
    if topk:
        out["topk_ids_NK"] = torch.empty(N, topk, dtype=torch.int64, device=dev)
        out["topk_logp_NK"] = torch.empty(N, topk, dtype=torch.float32, device=dev)
    for lo in range(0, N, chunk):
        hi = min(lo + chunk, N)
        logp_CV = head_log_softmax(hidden_NH[lo:hi], head.weight_VH, temperature)
        if targets_N is not None:
            out["sampled_N"][lo:hi] = logp_CV.gather(1, targets_N[lo:hi, None].long())[:, 0]
        if topk:
            top = logp_CV.topk(topk, dim=-1)
            out["topk_ids_NK"][lo:hi], out["topk_logp_NK"][lo:hi] = top.indices, top.values
        del logp_CV
    return TeacherLogprobs(**out)


def teacher_fields(
    head: TeacherHead,
    input_ids_BT: Tensor,
    response_mask_BT: Tensor,
    teacher_hidden_BTH: Tensor,
    *,
    topk: int = 0,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, Tensor]:
    """The teacher's per-token fields of a `TrainBatch`, from its hidden states.

    Returns {"logp_teacher_BT": [B, T]} and, for topk > 0, "teacher_topk_ids_BTK" /
    "teacher_topk_logp_BTK" [B, T, K], laid out like `learner.batch.collate` (zero off the
    response columns): `dataclasses.replace(batch, **teacher_fields(...))` gives the batch the
    sampled and top-K paths read today.
    """
    sel_BT = response_mask_BT != 0
    logps = teacher_logprobs(
        head,
        teacher_hidden_BTH[sel_BT],
        targets_N=input_ids_BT[sel_BT],
        topk=topk,
        temperature=temperature,
        chunk=chunk,
    )
    B, T = input_ids_BT.shape
    fields = {
        "logp_teacher_BT": logps.sampled_N.new_zeros(B, T).masked_scatter(sel_BT, logps.sampled_N)
    }
    if topk:
        sel_BTK = sel_BT.unsqueeze(-1).expand(B, T, topk)
        fields["teacher_topk_ids_BTK"] = logps.topk_ids_NK.new_zeros(B, T, topk).masked_scatter(
            sel_BTK, logps.topk_ids_NK
        )
        fields["teacher_topk_logp_BTK"] = logps.topk_logp_NK.new_zeros(B, T, topk).masked_scatter(
            sel_BTK, logps.topk_logp_NK
        )
    return fields


# ------------------------------------------------------------------- the full vocabulary


def full_vocab_logprobs(
    model: torch.nn.Module,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    positions_BT: Tensor,
    teacher_hidden_BTH: Tensor,
    head: TeacherHead,
    *,
    divergence: Divergence | str,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    ratio_clip: float | None = 10.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor, Tensor]:
    """(logp_BT, d_BT, clamped_BT) for the full-vocabulary loss, one pass of the student's body.

    logp_BT: log π_θ(x_i | x_<i) at τ (as `learner.logprobs.sampled_logprobs`); d_BT: the exact
    D_f(π_θ(·|x_<i) ‖ π_T(·|x_<i)) (`learner.dense.full_vocab_divergence`); clamped_BT: entries
    of ell clamped at ±ratio_clip. All three at the columns where positions_BT ≠ 0 (column 0
    must be 0), zero elsewhere; logp_BT and d_BT carry the gradient into the model.
    The student's softmax runs over the first head.vocab_size rows of its output layer (the
    tokenizer's length; every target id must be below it). The sampled log-probs and the
    divergence come from one chunked function (`learner.dense.full_vocab_terms`) on
    chunk_size // FULL_CHUNK_DIVISOR positions at a time (at least 1; chunk_size 0 is taken as
    the default).
    """
    if positions_BT.shape != input_ids_BT.shape or bool((positions_BT[:, 0] != 0).any()):
        raise ValueError("positions_BT must be [B, T] like the ids, with column 0 unset")
    chunk = max(1, (chunk_size if chunk_size > 0 else DEFAULT_CHUNK_SIZE) // FULL_CHUNK_DIVISOR)
    V = head.vocab_size
    student_head = _output_layer(model)
    if student_head.out_features < V:
        raise ValueError(
            f"the student's output layer has {student_head.out_features} rows, fewer than the "
            f"teacher's {V}"
        )
    hidden_NH, targets_N, sel_BT1 = selected_hidden(
        model, input_ids_BT, attention_mask_BT, positions_BT, V
    )
    t_hidden_NH = teacher_hidden_BTH[:, 1:][sel_BT1].to(hidden_NH.device)
    t_weight_VH = head.weight_VH.to(hidden_NH.device)

    def both(h_NH: Tensor):
        return full_vocab_terms(
            h_NH,
            t_hidden_NH,
            t_weight_VH,
            divergence=divergence,
            targets_N=targets_N,
            student_weight_VH=_real_rows(student_head, V),
            temperature=temperature,
            teacher_temperature=teacher_temperature,
            ratio_clip=ratio_clip,
            chunk=chunk,
        )

    # One call as the head's forward, so that ZeRO-3 gathers the student's weight around it.
    d_N, logp_N, clamped_N = _call_as_forward(student_head, both, hidden_NH)
    return tuple(place_selected(v_N, sel_BT1) for v_N in (logp_N, d_N, clamped_N))


def full_batch_loss(
    model: torch.nn.Module,
    batch,
    teacher_hidden_BTH: Tensor,
    head: TeacherHead,
    *,
    divergence: Divergence | str,
    discount: float,
    ratio_clip: float | None,
    is_cap: float | None,
    aggregation: str,
    normaliser: float,
    temperature: float = 1.0,
    teacher_temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor, DenseStats]:
    """(loss, logp_learner_BT, DenseStats): OPD+ over the full vocabulary of a `TrainBatch`.

    `full_vocab_logprobs` on the batch's response columns, then
    `learner.dense.full_dense_surrogate_loss` (direct term D_t + the state-distribution term
    with A_t = −Σ_{k>t} γ^{k−t} sg(D_k)). The batch's logp_teacher_BT is used for the
    `ell_mean` statistic only. ratio_clip None (or 0) disables clamping.
    """
    ratio_clip = ratio_clip or None
    logp_BT, d_BT, clamped_BT = full_vocab_logprobs(
        model,
        batch.input_ids_BT,
        batch.attention_mask_BT,
        batch.response_mask_BT,
        teacher_hidden_BTH,
        head,
        divergence=divergence,
        temperature=temperature,
        teacher_temperature=teacher_temperature,
        ratio_clip=ratio_clip,
        chunk_size=chunk_size,
    )
    loss, stats = full_dense_surrogate_loss(
        d_BT,
        logp_BT,
        batch.logp_sampler_BT,
        batch.response_mask_BT,
        discount=discount,
        is_cap=is_cap,
        aggregation=aggregation,
        normaliser=normaliser,
        clamped_BT=clamped_BT,
        vocab_size=head.vocab_size,
        logp_teacher_BT=batch.logp_teacher_BT,
        ratio_clip=ratio_clip,
        student_mask_BT=batch.student_mask_BT,
    )
    return loss, logp_BT, stats
