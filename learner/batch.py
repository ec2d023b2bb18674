"""The learner's padded batch: scored rollouts laid out in full-sequence coordinates.

Each row is prompt + response, right-padded to the longest row. Per-token values use the
alignment convention of `rollout.alignment`: column i of a per-token tensor belongs to token
x_i and holds log π(x_i | x_<i). For a row with prompt length P and response length R the
response occupies columns P .. P+R−1 (`response_positions(P, R)`), which is where the
response mask is 1 and the teacher / sampler log-probs are placed; every other column is 0.
In an episode the response is the whole trajectory after the prompt (the student's turns and
the environment's answers); `student_mask_BT` says which of its columns are the student's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from rollout.alignment import response_positions
from rollout.records import ScoredRollout


@dataclass(frozen=True)
class TrainBatch:
    """Padded tensors for B sequences of padded length T.

    input_ids_BT:      [B, T] int64, prompt + response ids, right-padded with pad_id.
    attention_mask_BT: [B, T] int64, 1 on real tokens (prompt and response), 0 on padding.
    response_mask_BT:  [B, T] float32, 1.0 at response-token columns, else 0.
    logp_teacher_BT:   [B, T] float32, log π_teacher(x_i | x_<i) at response columns, else 0.
    logp_sampler_BT:   [B, T] float32, log π_sampler(x_i | x_<i) at response columns, else 0.
    versions_B:        [B] int64, policy version that sampled each row.
    sample_ids:        B sample ids, in row order.
    teacher_topk_ids_BTK:  optional [B, T, K] int64, the teacher's top-K ids for column i's
                           next-token distribution π(· | x_<i) at response columns, else 0.
    teacher_topk_logp_BTK: optional [B, T, K] float32, their teacher log-probs, else 0.
    teacher_hidden_BTH:    optional [B, T, H] (the teacher engine's dtype), column i = the
                           teacher's final hidden state at position i − 1 (the one whose
                           logits give π_T(· | x_<i)) at response columns, else 0
                           (distill.teacher_topk = "full", `learner.teacher_head`).
    student_mask_BT:       optional [B, T] float32, 1.0 at the student's response columns, 0 at
                           an episode's environment tokens and off the response (docs/math.md
                           §10); None when no row is an episode (every response token is the
                           student's).
    """

    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    response_mask_BT: Tensor
    logp_teacher_BT: Tensor
    logp_sampler_BT: Tensor
    versions_B: Tensor
    sample_ids: tuple[str, ...]
    teacher_topk_ids_BTK: Tensor | None = None
    teacher_topk_logp_BTK: Tensor | None = None
    teacher_hidden_BTH: Tensor | None = None
    student_mask_BT: Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids_BT.shape)
        if len(shape) != 2:
            raise ValueError(f"input_ids_BT must be [B, T], got {shape}")
        for name in ("attention_mask_BT", "response_mask_BT", "logp_teacher_BT", "logp_sampler_BT"):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} has shape {got}, expected {shape}")
        if tuple(self.versions_B.shape) != shape[:1]:
            raise ValueError(
                f"versions_B has shape {tuple(self.versions_B.shape)}, expected {shape[:1]}"
            )
        if len(self.sample_ids) != shape[0]:
            raise ValueError(f"{len(self.sample_ids)} sample_ids for {shape[0]} rows")
        ids, logp = self.teacher_topk_ids_BTK, self.teacher_topk_logp_BTK
        if (ids is None) != (logp is None):
            raise ValueError("teacher_topk_ids_BTK and teacher_topk_logp_BTK come together")
        if ids is not None and not (
            ids.dim() == 3 and tuple(ids.shape[:2]) == shape and ids.shape == logp.shape
        ):
            raise ValueError(
                f"teacher top-K shapes {tuple(ids.shape)} / {tuple(logp.shape)}, "
                f"expected [B, T, K] with [B, T] = {shape}"
            )
        hidden = self.teacher_hidden_BTH
        if hidden is not None and not (hidden.dim() == 3 and tuple(hidden.shape[:2]) == shape):
            raise ValueError(
                f"teacher_hidden_BTH has shape {tuple(hidden.shape)}, expected [B, T, H] with "
                f"[B, T] = {shape}"
            )
        if hidden is not None and ids is not None:
            raise ValueError("a batch carries the teacher's top-K or its hidden states, not both")
        student = self.student_mask_BT
        if student is not None and tuple(student.shape) != shape:
            raise ValueError(f"student_mask_BT has shape {tuple(student.shape)}, expected {shape}")

    @property
    def topk(self) -> int:
        """K of the teacher's top-K (0: sampled-token OPD+ only)."""
        ids = self.teacher_topk_ids_BTK
        return 0 if ids is None else ids.shape[-1]

    @property
    def num_sequences(self) -> int:
        return self.input_ids_BT.shape[0]

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask_BT.sum().item())

    @property
    def student_response_mask_BT(self) -> Tensor:
        """[B, T] float32, 1.0 at the response columns the student sampled: the response mask,
        times the student mask in an episode. What the loss, its normaliser and the IS and
        mismatch statistics count."""
        if self.student_mask_BT is None:
            return self.response_mask_BT
        return self.response_mask_BT * self.student_mask_BT

    @property
    def num_student_tokens(self) -> int:
        return int(self.student_response_mask_BT.sum().item())

    def to(self, device: torch.device | str) -> TrainBatch:
        """The same batch with every tensor on `device`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return TrainBatch(
            **{k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()}
        )


def collate(scored: list[ScoredRollout], *, pad_id: int) -> TrainBatch:
    """Concatenate prompt + response per sample and right-pad to a [B, T] `TrainBatch`."""
    if not scored:
        raise ValueError("cannot collate an empty list of rollouts")
    T = max(s.rollout.num_tokens for s in scored)
    B = len(scored)
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.int64)
    attention_mask_BT = torch.zeros((B, T), dtype=torch.int64)
    response_mask_BT = torch.zeros((B, T), dtype=torch.float32)
    logp_teacher_BT = torch.zeros((B, T), dtype=torch.float32)
    logp_sampler_BT = torch.zeros((B, T), dtype=torch.float32)
    topk = _common_topk(scored)
    topk_ids_BTK = torch.zeros((B, T, topk), dtype=torch.int64) if topk else None
    topk_logp_BTK = torch.zeros((B, T, topk), dtype=torch.float32) if topk else None
    hidden_BTH = _hidden_buffer(scored, B, T)
    episodes = any(s.rollout.episode is not None for s in scored)
    student_mask_BT = torch.zeros((B, T), dtype=torch.float32) if episodes else None
    for b, s in enumerate(scored):
        r = s.rollout
        P, R = len(r.prompt_ids), len(r.response_ids)
        span = response_positions(P, R)
        input_ids_BT[b, : P + R] = torch.tensor(r.prompt_ids + r.response_ids, dtype=torch.int64)
        attention_mask_BT[b, : P + R] = 1
        response_mask_BT[b, span] = 1.0
        logp_teacher_BT[b, span] = torch.tensor(s.logp_teacher, dtype=torch.float32)
        logp_sampler_BT[b, span] = torch.tensor(r.logp_sampler, dtype=torch.float32)
        if topk and R:
            topk_ids_BTK[b, span] = torch.tensor(s.teacher_topk_ids, dtype=torch.int64)
            topk_logp_BTK[b, span] = torch.tensor(s.teacher_topk_logp, dtype=torch.float32)
        if hidden_BTH is not None:
            # Row t of the scorer's [R, H] predicts response token t (column P + t): column i
            # holds the state at position i − 1, as the top-K fields (rollout.alignment).
            hidden_BTH[b, span] = s.teacher_hidden
        if student_mask_BT is not None:
            mask = r.student_mask or (1,) * R  # a single-turn row: all the student's
            student_mask_BT[b, span] = torch.tensor(mask, dtype=torch.float32)
    versions_B = torch.tensor([s.policy_version for s in scored], dtype=torch.int64)
    return TrainBatch(
        input_ids_BT=input_ids_BT,
        attention_mask_BT=attention_mask_BT,
        response_mask_BT=response_mask_BT,
        logp_teacher_BT=logp_teacher_BT,
        logp_sampler_BT=logp_sampler_BT,
        versions_B=versions_B,
        sample_ids=tuple(s.sample_id for s in scored),
        teacher_topk_ids_BTK=topk_ids_BTK,
        teacher_topk_logp_BTK=topk_logp_BTK,
        teacher_hidden_BTH=hidden_BTH,
        student_mask_BT=student_mask_BT,
    )


def _hidden_buffer(scored: list[ScoredRollout], B: int, T: int) -> Tensor | None:
    """A zero [B, T, H] buffer when the rollouts carry teacher hidden states (all or none, one
    H and dtype), else None."""
    carries = {s.teacher_hidden is not None for s in scored}
    if len(carries) > 1:
        raise ValueError("some rollouts carry the teacher's hidden states and some do not")
    if carries != {True}:
        return None
    kinds = {(s.teacher_hidden.shape[1], s.teacher_hidden.dtype) for s in scored}
    if len(kinds) > 1:
        raise ValueError(f"rollouts carry teacher hidden states of different sizes {kinds}")
    ((H, dtype),) = kinds
    return torch.zeros((B, T, H), dtype=dtype)


def _common_topk(scored: list[ScoredRollout]) -> int:
    """The K all rollouts share (0 = none carries top-K); mixed or unequal K is an error."""
    carries = {s.teacher_topk_ids is not None for s in scored}
    if len(carries) > 1:
        raise ValueError("some rollouts carry the teacher's top-K and some do not")
    ks = {s.topk for s in scored if s.rollout.response_ids}
    if len(ks) > 1:
        raise ValueError(f"rollouts carry different teacher top-K sizes {sorted(ks)}")
    # All responses empty: no position to carry top-K for; the batch has no loss either way.
    return ks.pop() if carries == {True} and ks else 0


def split(batch: TrainBatch, n: int) -> list[TrainBatch]:
    """n contiguous row shards (sizes differ by at most one), one per data-parallel rank.

    Shards keep the full padded length T, so concatenating them gives back `batch`. Every shard
    must be non-empty: an empty rank would have no gradient to contribute to the all-reduce.
    """
    if not 1 <= n <= batch.num_sequences:
        raise ValueError(f"cannot split {batch.num_sequences} sequences into {n} non-empty shards")
    bounds = torch.linspace(0, batch.num_sequences, n + 1).round().long().tolist()
    names = [f.name for f in fields(batch) if f.name != "sample_ids"]
    shards = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        # clone(): a pickled view (e.g. sent to a Ray actor) would carry the whole storage.
        rows = {
            name: None if getattr(batch, name) is None else getattr(batch, name)[lo:hi].clone()
            for name in names
        }
        shards.append(TrainBatch(**rows, sample_ids=batch.sample_ids[lo:hi]))
    return shards
