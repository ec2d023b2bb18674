"""The enumerable sequence space of the exactness tests: every sequence of length L over a
vocabulary of V tokens, and every prefix (state) of them, as index tensors."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceSpace:
    """seqs: all V**L sequences. prefixes: all states (lengths 0..L−1); a tabular student has
    one softmax row per prefix. STATE_BT[b, t] is the prefix id before token t of sequence b,
    TOKEN_BT[b, t] the token; the PREFIX_* tensors do the same for the prefixes themselves,
    right-padded to length L − 1 (padding reads state 0, token 0, masked)."""

    seqs: list
    prefixes: list
    state_BT: torch.Tensor
    token_BT: torch.Tensor
    prefix_state_PT: torch.Tensor
    prefix_token_PT: torch.Tensor
    prefix_mask_PT: torch.Tensor


def sequence_space(V: int, L: int) -> SequenceSpace:
    seqs = list(itertools.product(range(V), repeat=L))
    prefixes = [p for t in range(L) for p in itertools.product(range(V), repeat=t)]
    prefix_id = {p: i for i, p in enumerate(prefixes)}
    return SequenceSpace(
        seqs=seqs,
        prefixes=prefixes,
        state_BT=torch.tensor([[prefix_id[y[:t]] for t in range(L)] for y in seqs]),
        token_BT=torch.tensor(seqs),
        prefix_state_PT=torch.tensor(
            [[prefix_id[p[:t]] if t < len(p) else 0 for t in range(L - 1)] for p in prefixes]
        ),
        prefix_token_PT=torch.tensor([list(p) + [0] * (L - 1 - len(p)) for p in prefixes]),
        prefix_mask_PT=torch.tensor([[float(t < len(p)) for t in range(L - 1)] for p in prefixes]),
    )
