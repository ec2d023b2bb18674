"""Engine checks shared by the weight-sync tests (nccl and gloo)."""

from __future__ import annotations

import torch

PROMPTS = [[1, 4, 5, 6, 7], [1, 9, 8], [1, 12, 13, 14, 15, 16, 17], [1, 18, 19, 10, 11]]


def worst_vs_transformers(engine, hf) -> float:
    """Largest |log π_engine − log π_transformers| over PROMPTS' sampled tokens."""
    from rollout.alignment import response_positions, token_logprobs

    gens = engine.generate(PROMPTS, max_tokens=10, temperature=1.0, seed=0)
    worst = 0.0
    for prompt, (gen,) in zip(PROMPTS, gens, strict=True):
        ids = torch.tensor([prompt + list(gen.token_ids)])
        with torch.no_grad():
            ref = token_logprobs(hf(ids).logits, ids)[0][
                response_positions(len(prompt), len(gen.token_ids))
            ]
        worst = max(worst, (ref - torch.tensor(gen.logprobs)).abs().max().item())
    return worst
