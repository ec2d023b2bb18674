"""The learner's log-probs of the sampled tokens, without the full [B, T, V] float32 logits.

For a causal LM with final hidden states h and output layer W (logits = h·Wᵀ), the policy at
sampling temperature τ is π_θ(·|s) = softmax(W h / τ). Following `rollout.alignment`, position
i of a sequence carries

    logp_BT[b, i] = log softmax(W h[b, i−1] / τ)[x[b, i]]          (i ≥ 1; h[i−1] predicts x_i)

`sampled_logprobs` runs the model's body once (hidden states for every position), keeps only
the requested positions (the response), and pushes them through the output layer in chunks of
`chunk_size` positions: logits → /τ → logsumexp → gather, one chunk at a time. Only the per-
position logsumexp is kept for the backward pass, which recomputes each chunk's logits and
forms the gradient of the log-softmax in place (`_ChunkedHeadLogprobs`). Peak extra memory is
a few [chunk_size, V] float32 buffers instead of several [B, T, V] ones; the output layer's
FLOPs are spent on response positions only (plus one recomputation in the backward pass).

The same pass can gather the student's log-probs at any other ids per position
(`extra_ids_BTK`, e.g. the teacher's top-K for dense distillation), at the same temperature.

Padding rows. An output layer may have more rows than the tokenizer has ids (Qwen: 151936 or
152064 rows for 151665 ids). With `vocab_size` = the tokenizer's length, only the first
`vocab_size` rows of W take part: π_θ = softmax(W[:vocab_size] h / τ), the policy the samplers
draw from (`rollout.engine` slices their logits the same way; docs/math.md "Padding rows").
The padding rows get no gradient.

Imports only torch; the model is anything callable like a Hugging Face causal LM (including a
DeepSpeed engine wrapping one, whose forward hooks must see the call).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_SIZE = 512


def sampled_logprobs(
    model: torch.nn.Module,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    positions_BT: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra_ids_BTK: Tensor | None = None,
    vocab_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log π_θ(x_i | x_<i) at temperature τ for the positions where positions_BT ≠ 0.

    model: a Hugging Face causal LM (or a wrapper whose call forwards to one) that accepts
        `output_hidden_states` and a tensor `logits_to_keep`, with a bias-free linear output
        layer (`get_output_embeddings()`).
    input_ids_BT, attention_mask_BT: [B, T] as in `learner.batch.TrainBatch`.
    positions_BT: [B, T], nonzero where a log-prob is wanted (the response mask); column 0 must
        be 0 (it has no predecessor).
    temperature: τ > 0; the policy is softmax(logits / τ).
    chunk_size: positions per output-layer chunk (memory ∝ chunk_size · V).
    extra_ids_BTK: optional [B, T, K] int64 ids; their log-probs under the same distribution
        are returned as well (only at the selected positions).
    vocab_size: the tokenizer's length V ≤ the output layer's rows; the softmax runs over rows
        [0, V) (the rest is padding). None: every row. Every target and extra id must be < V.
    Returns logp_BT [B, T] (float32, or float64 for a float64 model), zero where positions_BT is 0 (with gradient through the
    model), or (logp_BT, logp_extra_BTK) when extra_ids_BTK is given.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if positions_BT.shape != input_ids_BT.shape:
        raise ValueError(
            f"positions_BT has shape {tuple(positions_BT.shape)}, "
            f"expected {tuple(input_ids_BT.shape)}"
        )
    if bool((positions_BT[:, 0] != 0).any()):
        raise ValueError("positions_BT marks column 0, which has no log-prob")
    if extra_ids_BTK is not None and extra_ids_BTK.shape[:2] != input_ids_BT.shape:
        raise ValueError(
            f"extra_ids_BTK has shape {tuple(extra_ids_BTK.shape)}, expected [B, T, K] with "
            f"[B, T] = {tuple(input_ids_BT.shape)}"
        )
    head = _output_layer(model)
    rows = head.out_features  # not weight.shape: ZeRO-3 partitions the weight outside forward
    V = rows if vocab_size is None else int(vocab_size)
    if not 0 < V <= rows:
        raise ValueError(
            f"vocab_size {vocab_size} must be in [1, {rows}] (the output layer's rows)"
        )
    if extra_ids_BTK is not None and extra_ids_BTK.numel():
        lo, hi = int(extra_ids_BTK.min()), int(extra_ids_BTK.max())
        if not 0 <= lo <= hi < V:
            raise ValueError(f"extra_ids_BTK span [{lo}, {hi}], outside the vocabulary of {V}")
    hidden_NH, targets_N, sel_BT1 = selected_hidden(
        model, input_ids_BT, attention_mask_BT, positions_BT, V, rows=rows
    )
    extra_NK = None if extra_ids_BTK is None else extra_ids_BTK[:, 1:][sel_BT1]
    logp_N, logp_extra_NK = _call_as_forward(
        head,
        lambda h_NH: _ChunkedHeadLogprobs.apply(
            h_NH, _real_rows(head, V), targets_N, extra_NK, float(temperature), int(chunk_size)
        ),
        hidden_NH,
    )
    B, T = input_ids_BT.shape
    logp_BT = place_selected(logp_N, sel_BT1)
    if extra_ids_BTK is None:
        return logp_BT
    K = extra_ids_BTK.shape[-1]
    sel_BTK = sel_BT1.unsqueeze(-1).expand(B, T - 1, K)
    logp_extra = logp_extra_NK.new_zeros(B, T - 1, K).masked_scatter(sel_BTK, logp_extra_NK)
    return logp_BT, torch.cat([logp_extra.new_zeros(B, 1, K), logp_extra], 1)


def selected_hidden(
    model: torch.nn.Module,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    positions_BT: Tensor,
    V: int,
    *,
    rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden_NH, targets_N, sel_BT1): the body's output at the N positions that predict the
    columns where positions_BT ≠ 0, the tokens there, and the [B, T-1] selection. Column i's
    log-prob comes from hidden state i−1 (rollout.alignment's off-by-one); every selected
    token must be < V (rows: the output layer's, for the message)."""
    hidden_BTH = final_hidden_states(model, input_ids_BT, attention_mask_BT)
    sel_BT1 = positions_BT[:, 1:] != 0
    hidden_NH = hidden_BTH[:, :-1][sel_BT1]
    targets_N = input_ids_BT[:, 1:][sel_BT1]
    if targets_N.numel() and int(targets_N.max()) >= V:
        padding = f" (the output layer has {rows} rows; rows from {V} on are padding)"
        raise ValueError(
            f"a selected token id is {int(targets_N.max())}, outside the vocabulary of {V}"
            + (padding if rows is not None and rows != V else "")
        )
    return hidden_NH, targets_N, sel_BT1


def place_selected(values_N: Tensor, sel_BT1: Tensor) -> Tensor:
    """[B, T]: ``values_N`` back at the selected columns (``selected_hidden``), zero elsewhere
    and in column 0."""
    B = sel_BT1.shape[0]
    inner = values_N.new_zeros(B, sel_BT1.shape[1]).masked_scatter(sel_BT1, values_N)
    return torch.cat([values_N.new_zeros(B, 1), inner], 1)


def final_hidden_states(
    model: torch.nn.Module, input_ids_BT: Tensor, attention_mask_BT: Tensor
) -> Tensor:
    """[B, T, H]: the body's output (after the final norm), the input of the output layer.

    Goes through the model's own forward (so wrappers such as a DeepSpeed engine run their
    hooks) with an empty `logits_to_keep`: the output layer sees zero positions there.
    """
    keep_none = torch.zeros(0, dtype=torch.long, device=input_ids_BT.device)
    out = model(
        input_ids=input_ids_BT,
        attention_mask=attention_mask_BT,
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=keep_none,
    )
    return out.hidden_states[-1]


def _output_layer(model: torch.nn.Module) -> torch.nn.Linear:
    inner = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    config = getattr(inner, "config", None)
    for key in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, key, None) not in (None, 1.0):
            raise ValueError(
                f"{type(inner).__name__} post-processes its logits ({key}); the chunked "
                "log-prob path supports a plain linear output layer only"
            )
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(
            f"{type(inner).__name__}'s output layer is {type(head).__name__} "
            f"(bias: {getattr(head, 'bias', None) is not None}); the chunked log-prob path needs "
            "a bias-free torch.nn.Linear"
        )
    return head


def _real_rows(head: torch.nn.Linear, vocab_size: int) -> Tensor:
    """W[:vocab_size] (the weight itself when there is no padding row). Called inside the
    head's forward: ZeRO-3 gathers the weight only there."""
    weight = head.weight
    return weight if vocab_size == head.out_features else weight[:vocab_size]


def _call_as_forward(module: torch.nn.Module, fn, *args):
    """fn(*args) run as `module`'s forward, so that hooks around it fire.

    Parameter-managing wrappers (DeepSpeed ZeRO-3) gather a module's weights only inside its
    forward and again before its backward; the chunked function reads `module.weight` directly.
    """
    module.forward = fn
    try:
        return module(*args)
    finally:
        del module.forward  # back to the class's forward


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """(h_NH, W_VH) → log softmax(h Wᵀ / τ) at targets_N (and at extra_NK), chunk by chunk.

    Forward keeps only lse_N = logsumexp(h Wᵀ / τ). With z = h Wᵀ / τ and p = softmax(z), the
    backward uses ∂ log p_y / ∂z = onehot(y) − p, so for upstream gradients g_N (and G_NK)

        ∂L/∂z = onehot(y)·g + Σ_k onehot(e_k)·G_k − p·(g + Σ_k G_k),    ∂L/∂logits = ∂L/∂z / τ

    and ∂L/∂h = (∂L/∂logits) W, ∂L/∂W = (∂L/∂logits)ᵀ h, recomputing each chunk's logits.
    Logits and p are at least float32 whatever the weights' dtype (as `rollout.alignment`).
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, extra_NK, temperature, chunk_size):
        N, dtype = hidden_NH.shape[0], _compute_dtype(hidden_NH)
        logp_N = hidden_NH.new_empty(N, dtype=dtype)
        lse_N = hidden_NH.new_empty(N, dtype=dtype)
        K = 0 if extra_NK is None else extra_NK.shape[1]
        logp_extra_NK = hidden_NH.new_empty(N, K, dtype=dtype)
        for lo in range(0, N, chunk_size):
            hi = min(lo + chunk_size, N)
            z_CV = _scaled_logits(hidden_NH[lo:hi], weight_VH, temperature)
            lse_C = torch.logsumexp(z_CV, dim=-1)
            lse_N[lo:hi] = lse_C
            logp_N[lo:hi] = z_CV.gather(1, targets_N[lo:hi, None]).squeeze(1) - lse_C
            if K:
                logp_extra_NK[lo:hi] = z_CV.gather(1, extra_NK[lo:hi]) - lse_C[:, None]
            del z_CV
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N)
        ctx.extra_NK = extra_NK
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logp_N, logp_extra_NK

    @staticmethod
    def backward(ctx, g_N, g_NK):
        hidden_NH, weight_VH, targets_N, lse_N = ctx.saved_tensors
        extra_NK, tau, chunk_size = ctx.extra_NK, ctx.temperature, ctx.chunk_size
        need_h, need_w = ctx.needs_input_grad[:2]
        N, dtype = hidden_NH.shape[0], lse_N.dtype
        g_N = torch.zeros_like(lse_N) if g_N is None else g_N.to(dtype)
        use_extra = extra_NK is not None and g_NK is not None and extra_NK.shape[1] > 0
        grad_h = torch.empty_like(hidden_NH) if need_h else None
        # Accumulate ∂L/∂W in (at least) float32 across chunks even for bf16 weights.
        grad_w = torch.zeros(weight_VH.shape, dtype=dtype, device=weight_VH.device)
        for lo in range(0, N, chunk_size):
            hi = min(lo + chunk_size, N)
            h_CH = hidden_NH[lo:hi]
            # p = softmax(z), formed in place in the recomputed logits buffer.
            d_CV = _scaled_logits(h_CH, weight_VH, tau).sub_(lse_N[lo:hi, None]).exp_()
            total_C = g_N[lo:hi]
            if use_extra:
                total_C = total_C + g_NK[lo:hi].to(dtype).sum(1)
            d_CV.mul_(-total_C[:, None])
            d_CV.scatter_add_(1, targets_N[lo:hi, None], g_N[lo:hi, None])
            if use_extra:
                d_CV.scatter_add_(1, extra_NK[lo:hi], g_NK[lo:hi].to(dtype))
            d_CV.div_(tau)
            d_low = d_CV.to(weight_VH.dtype)
            if need_h:
                grad_h[lo:hi] = d_low @ weight_VH
            if need_w:
                grad_w.addmm_(d_CV.t(), h_CH.to(dtype))
            del d_CV, d_low
        return grad_h, grad_w.to(weight_VH.dtype) if need_w else None, None, None, None, None


def _compute_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision inputs (bf16 log-softmax loses ~1e-2), else their own dtype."""
    return torch.promote_types(t.dtype, torch.float32)


def _scaled_logits(h_CH: Tensor, weight_VH: Tensor, temperature: float) -> Tensor:
    """[C, V] z = (h Wᵀ) / τ in `_compute_dtype`, a fresh buffer the caller may modify."""
    z_CV = (h_CH @ weight_VH.t()).to(_compute_dtype(h_CH))
    if temperature != 1.0:
        z_CV.div_(temperature)
    return z_CV
