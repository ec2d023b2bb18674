"""The one place that owns the log-prob off-by-one.

Convention (vLLM's ``prompt_logprobs``): position i of a sequence carries
log π(x_i | x_<i); position 0 has none. A causal LM's logits at position i predict
token i+1, so the log-prob of token i comes from logits[i-1]. Every consumer (teacher
scoring, learner recompute, tests) goes through these functions.
"""

from __future__ import annotations

import torch


def response_positions(prompt_len: int, response_len: int) -> slice:
    """Slice of per-position log-probs that belongs to the response tokens."""
    if prompt_len < 1:
        raise ValueError("prompt must have at least one token (position 0 has no log-prob)")
    return slice(prompt_len, prompt_len + response_len)


def token_logprobs(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """logp_BT[b, i] = log softmax(logits[b, i-1])[input_ids[b, i]] for i ≥ 1; logp_BT[:, 0] = 0.

    Computed in float32 (bf16 log-softmax loses ~1e-2 of precision). Shapes: logits [B, T, V],
    ids [B, T] → [B, T].
    """
    logits = logits_BTV[:, :-1].float()
    targets = input_ids_BT[:, 1:]
    # logsumexp-minus-gather avoids materialising a second [B, T, V] log-softmax tensor.
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(logp, (1, 0), value=0.0)
