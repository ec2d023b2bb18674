"""The data-parallel learner: one Ray actor per DeepSpeed rank, driven by `LearnerGroup`.

`LearnerRank` is a thin shell over `learner.engine.LearnerEngine` (process, resources,
threads). `LearnerGroup` is what the driver holds: it collates a step's scored rollouts,
splits the batch into one contiguous shard per rank, computes the global normaliser of the
whole batch (so that the shards' losses sum to the full-batch loss) and calls every rank at
once — DeepSpeed's collectives need all ranks inside the same call.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from learner.batch import collate, split
from learner.settings import LossSettings, OptimSettings
from learner.step import (
    NonFiniteError,
    check_finite,
    diverged_message,
    global_normaliser,
    merge_metrics,
)
from rollout.records import ScoredRollout


@ray.remote
class LearnerRank:
    """One DeepSpeed rank in its own process; forwards to a `LearnerEngine`."""

    def __init__(self, num_threads: int) -> None:
        # Ray reserves CPUs but does not pin torch's intra-op pool; oversubscribing the cores
        # that other actors (vLLM engines, the other ranks) reserved slows everyone down.
        torch.set_num_threads(num_threads)
        self.engine = None
        self.sender = None  # rollout.weight_transfer.WeightSender, collective sync only

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port free on it, for the process group's master."""
        from services.cluster import free_node_address

        return free_node_address()

    def build(self, **engine_kwargs) -> None:
        from learner.engine import LearnerEngine

        self.engine = LearnerEngine(**engine_kwargs)

    def train_step(self, batch, *, normaliser: float) -> dict[str, float]:
        return self.engine.train_step(batch, normaliser=normaliser)

    def export_weights(self, keep_result: bool) -> list[tuple[str, torch.Tensor]]:
        # Every rank takes part (ZeRO-3 gathers are collective); one copy travels back.
        weights = self.engine.export_weights()
        return weights if keep_result else []

    def save_checkpoint(self, path: str, client_state: dict, keep: int | None) -> str:
        from learner import manifest

        try:
            return str(self.engine.save_checkpoint(path, client_state, keep=keep))
        except RuntimeError as exc:  # torch's writer hides a full disk's errno
            raise manifest.write_failure(path, exc) from exc

    def load_checkpoint(self, path: str) -> tuple[dict, object]:
        client = self.engine.load_checkpoint(path)
        return client, self.engine.last_load  # which tag, and what was skipped and why

    def save_hf(self, path: str) -> None:
        self.engine.save_hf(path)

    # Run storage (services/storage.py): the marker check, and run.storage's copies (rank 0).
    def probe_storage(self, storage) -> dict:
        from services.storage import probe

        return probe(storage)

    def upload_checkpoint(self, storage, path: str, tag: str, keep: int | None) -> None:
        storage.remote().upload_checkpoint(Path(path), tag, keep)

    def fetch_checkpoints(self, storage, path: str) -> list[str]:
        return storage.remote().fetch(Path(path))

    def upload_student(self, storage, path: str) -> None:
        storage.remote().upload_student(Path(path))

    # Collective weight sync (services/nccl_sync.py; NCCL or gloo). Must stay a plain
    # sequential actor: the send relies on running after the export on this same actor.
    def collective_sender_address(self) -> tuple[str, int]:
        return self.rendezvous_address()

    def collective_init_sender(
        self, master_address: str, master_port: int, world_size: int, dtype: str, backend: str
    ) -> None:
        from rollout.weight_transfer import WeightSender

        self.sender = WeightSender(
            master_address, master_port, world_size, backend=backend, dtype=dtype
        )

    def collective_stage_weights(self, is_sender: bool):
        weights = self.engine.export_weights()  # every rank: ZeRO-3 gathers are collective
        if not is_sender:
            return None
        if self.sender is None:
            raise RuntimeError("collective_init_sender was not called on learner rank 0")
        return self.sender.stage(weights)

    def collective_send_weights(self) -> float:
        return self.sender.send_staged()

    def collective_close_sender(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None


class LearnerGroup:
    """`num_ranks` data-parallel DeepSpeed ranks training the student.

    model_path: HF folder of the initial student. pad_id: id used to right-pad batches (padding is
    masked out, any valid id works). Ranks: `num_ranks` actors, each with the Ray options
    `rank_options` (num_cpus, num_gpus, custom resources); rank i is the named actor
    ``learner-rank-{i}``. optim / loss: the run's `learner.settings` objects, given to every rank
    once, at construction (built from the config by `services.parts.learner_settings`).
    num_threads: torch threads per rank (0 = the CPUs reserved in `rank_options`, at least 1).
    """

    def __init__(
        self,
        model_path: str,
        *,
        pad_id: int,
        num_ranks: int,
        rank_options: dict,
        optim: OptimSettings,
        loss: LossSettings,
        num_threads: int = 0,
        placement_timeout_s: float = 900.0,
        step_timeout_s: float = 0.0,
    ) -> None:
        if num_ranks < 1:
            raise ValueError(f"num_ranks must be >= 1, got {num_ranks}")
        if not (Path(model_path) / "config.json").is_file():
            raise FileNotFoundError(
                f"{model_path} is not a Hugging Face model folder (no config.json)"
            )
        self.pad_id = pad_id
        self._last_finite: tuple[int | None, dict] | None = None  # for NonFiniteError
        self.aggregation = loss.aggregation
        from services.cluster import actor_name

        num_threads = num_threads or max(1, int(rank_options.get("num_cpus", 1)))
        # Named by role and index so the dashboard's actor list reads as the pipeline.
        self.ranks = [
            LearnerRank.options(name=actor_name(f"learner-rank-{i}"), **rank_options).remote(
                num_threads
            )
            for i in range(num_ranks)
        ]
        from services.placement import KEYS, Ask, ray_resources, wait_started

        # Placed within ray.placement_timeout_s, or an error naming the rank and its resources.
        self.step_timeout_s = step_timeout_s  # learner.step_timeout_s (0 = no deadline)
        asks = [
            Ask(f"learner-rank-{i}", KEYS["learner"], ray_resources(rank_options))
            for i in range(num_ranks)
        ]
        try:
            wait_started(
                [r.__ray_ready__.remote() for r in self.ranks], asks, timeout_s=placement_timeout_s
            )
        except BaseException:
            self.shutdown()  # the ranks that were placed, and the pending ones, go
            raise
        (master_addr, master_port) = self._all(
            [self.ranks[0].rendezvous_address.remote()], "rendezvous_address"
        )[0]
        # All at once: process-group initialisation blocks until every rank has joined.
        try:
            self._all(
                [
                    r.build.remote(
                        model_path=model_path,
                        optim=optim,
                        loss=loss,
                        rank=i,
                        world_size=num_ranks,
                        master_addr=master_addr,
                        master_port=master_port,
                    )
                    for i, r in enumerate(self.ranks)
                ],
                "build",
            )
        except BaseException:
            self.shutdown()  # a rank that failed to build leaves none behind
            raise

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def train_step(
        self, scored: list[ScoredRollout], *, step: int | None = None
    ) -> dict[str, float]:
        """One optimizer step on `scored` (at least one sample per rank); `step` names it in
        errors. A NaN/Inf loss or gradient norm raises `learner.step.NonFiniteError` naming the
        step and the last finite step's values (a NaN loss before the optimizer step).

        Returns the full batch's metrics: `learner/loss` (the full-batch surrogate loss),
        token-weighted `distill/*` means, `distill/adv_abs_max` as a maximum,
        `learner/tokens` / `learner/sequences` totals, and the global `learner/grad_norm` and
        `learner/lr` (rank 0's; equal on every rank).
        """
        batch = collate(scored, pad_id=self.pad_id)
        normaliser = global_normaliser(batch, self.aggregation)
        shards = split(batch, self.num_ranks)
        try:
            per_rank = _get_all(
                [
                    r.train_step.remote(shard, normaliser=normaliser)
                    for r, shard in zip(self.ranks, shards, strict=True)
                ],
                timeout_s=self.step_timeout_s,
                call="train_step",
            )
        except NonFiniteError as exc:  # a rank's loss: add the step and the last finite values
            what = str(getattr(exc, "cause", None) or exc)  # Ray's wrapper: the rank's error
            raise NonFiniteError(diverged_message(step, what, self._last_finite)) from None
        metrics = merge_metrics(per_rank)
        check_finite(metrics, step=step, last=self._last_finite)
        self._last_finite = (step, metrics)
        return metrics

    def export_weights(self) -> list[tuple[str, torch.Tensor]]:
        """(HF name, CPU float32 tensor) for every parameter, ready for vLLM `reload_weights`."""
        refs = [r.export_weights.remote(keep_result=i == 0) for i, r in enumerate(self.ranks)]
        return self._all(refs, "export_weights")[0]

    def attach_storage(self, storage) -> None:
        """Check that every rank can use the run directory the driver prepared (it reads the
        driver's marker, `services.storage.probe`) and remember `storage` (a
        `services.storage.RunStorage`) for the copies to `run.storage`. Raises
        `RunStorageError` naming both hosts and the path when a rank cannot."""
        from services.storage import judge

        judge(storage, self._all([r.probe_storage.remote(storage) for r in self.ranks], "probe"))
        self.storage = storage

    def _all(self, refs: list, call: str) -> list:
        # Every collective call has the deadline of learner.step_timeout_s, not only the step:
        # a rank hung in a checkpoint write or an export stops the run the same way.
        return _get_all(refs, timeout_s=self.step_timeout_s, call=call)

    def _remote(self):
        storage = getattr(self, "storage", None)
        return storage if storage is not None and storage.uri else None

    def save_checkpoint(
        self, path: str | Path, client_state: dict, *, keep: int | None = None
    ) -> Path:
        """Crash-safe, durable DeepSpeed checkpoint under `path` (absolute; see
        `LearnerEngine.save_checkpoint`), then copied to `run.storage` when it is set."""
        refs = [r.save_checkpoint.remote(str(path), client_state, keep) for r in self.ranks]
        try:
            final = Path(self._all(refs, "save_checkpoint")[0])
        except OSError as exc:  # Ray's wrapper of a rank's OSError is one too
            if (err := rank_disk_error(exc, path)) is exc:
                raise
            raise err from None
        if (storage := self._remote()) is not None:
            upload = self.ranks[0].upload_checkpoint.remote(storage, str(path), final.name, keep)
            self._all([upload], "upload_checkpoint")
        return final

    def load_checkpoint(self, path: str | Path) -> dict:
        """Restore the newest checkpoint under `path` that verifies (downloaded from
        `run.storage` first when it is set); returns its client_state. When newer checkpoints
        were skipped (missing, or failing their manifest) the console says which and why."""
        if (storage := self._remote()) is not None:
            self._all([self.ranks[0].fetch_checkpoints.remote(storage, str(path))], "fetch")
        results = self._all([r.load_checkpoint.remote(str(path)) for r in self.ranks], "load")
        client, choice = results[0]
        note = choice.note(path) if choice is not None else None
        if note:
            from services.console import say

            say(note)
        return client

    def save_hf(self, path: str | Path) -> None:
        """Write the current student as a plain HF folder (with the source's tokenizer), then
        copy it to `run.storage` when it is set."""
        self._all([r.save_hf.remote(str(path)) for r in self.ranks], "save_hf")
        if (storage := self._remote()) is not None:
            self._all([self.ranks[0].upload_student.remote(storage, str(path))], "upload_student")

    def shutdown(self) -> None:
        """Kill the rank actors (their processes, and so the process group, end)."""
        for r in self.ranks:
            ray.kill(r)
        self.ranks = []


def rank_disk_error(exc: OSError, path: str | Path) -> OSError:
    """A rank's full or unwritable disk (its OSError, inside Ray's wrapper) as a DiskError
    naming ``path`` and what to do (services.metrics.disk_error); any other error unchanged."""
    from services.metrics import disk_error

    cause = getattr(exc, "cause", None)
    cause = cause if isinstance(cause, OSError) else exc
    err = disk_error(cause, path)
    return exc if err is cause else err


def _get_all(refs: list[ray.ObjectRef], timeout_s: float = 0.0, call: str = "a call") -> list:
    """Results of a collective call on every rank, raising the first rank's error at once.

    A plain ray.get waits in list order, so a failure on rank 1 would hide behind rank 0 blocking
    in the collective until DeepSpeed's timeout (30 min). ``timeout_s`` > 0: a rank that has not
    answered by then raises LearnerTimeout (the driver stops the run with the resume command).
    """
    import time

    from services.calls import LearnerTimeout

    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    pending = list(refs)
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            late = [f"learner-rank-{refs.index(r)}" for r in pending]
            raise LearnerTimeout(
                f"{', '.join(late)} did not answer {call} within {timeout_s:g} s "
                "(learner.step_timeout_s)"
            )
        ray.get(done)
    return ray.get(refs)
