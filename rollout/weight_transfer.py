"""Weight transfer into running student engines over NCCL (GPU only).

vLLM's native weight-transfer engine (``vllm.distributed.weight_transfer``) is the data plane.
This module is imported by the learner's rank 0 (``NcclWeightSender``) and by the sampler
actors (``NcclWeightReceiver``); it does not import vLLM's ``LLM`` engine, so a DeepSpeed rank
never loads the inference engine. The CPU path needs nothing from here: there the object store
hands tensors to ``StudentEngine.load_weights``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    WeightSource,
    WeightTransferInitRequest,
    WeightTransferUpdateRequest,
)

from services.errors import EngineError

if TYPE_CHECKING:
    from rollout.engine import StudentEngine

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Packed broadcast (a few large NCCL calls instead of one per tensor). Both ends read these
# constants, so they cannot disagree; the sender also checks them against vLLM's own payload.
NCCL_PACKED = True


# =================================================================================================
# GPU weight sync over NCCL — vLLM's native weight-transfer engine (vllm.distributed.weight_transfer).
#
# One NCCL group per run: rank 0 is the learner's sender, ranks 1..N are the sampler engines (one
# worker each: no tensor or data parallelism inside an engine). Every push is a packed broadcast
# from rank 0: the sender runs vLLM's NCCLTrainerWeightTransferEngine, each receiver runs the
# worker-side NCCLWeightTransferEngine through LLM.start_weight_update / update_weights /
# finish_weight_update. The control plane (who calls what, when, with which timeout) belongs to
# the caller — services.nccl_sync — so the learner never holds sampler handles.
#
# Nothing here touches CUDA at import time; on a CPU machine every entry point refuses with an
# EngineError before any NCCL call.
# =================================================================================================


def nccl_available() -> bool:
    """True when this process can join an NCCL weight-transfer group.

    Needs a visible CUDA (or ROCm) device and a loadable NCCL library. vLLM's communicator
    silently turns itself into a no-op when the library is missing or VLLM_DISABLE_PYNCCL is
    set — a broadcast would then "succeed" and leave garbage — so both are checked here.
    """
    if not torch.cuda.is_available():
        return False
    import vllm.envs as envs
    from vllm.distributed.device_communicators.pynccl_wrapper import NCCLLibrary

    if envs.VLLM_DISABLE_PYNCCL:
        return False
    try:
        NCCLLibrary()
    except OSError:  # ctypes could not load libnccl / librccl
        return False
    return True


def _check_group_args(master_address: str, master_port: int, world_size: int) -> None:
    if not master_address:
        raise EngineError("master_address is empty (the learner node's IP address is needed)")
    if not 0 < master_port < 65536:
        raise EngineError(f"master_port must be in 1..65535, got {master_port}")
    if world_size < 2:
        raise EngineError(
            f"world_size must be >= 2 (one sender + at least one engine), got {world_size}"
        )


def _wire_dtype(name: str) -> torch.dtype:
    if name not in WIRE_DTYPES:
        raise EngineError(f"wire dtype must be one of {sorted(WIRE_DTYPES)}, got {name!r}")
    return WIRE_DTYPES[name]


def nccl_worker_init_payload(
    master_address: str, master_port: int, rank_offset: int, world_size: int
) -> dict:
    """The ``init_info`` dict vLLM's worker-side NCCL engine is initialised with.

    Built by vLLM's own ``worker_init_payload`` from its ``NCCLWeightTransferInitInfo``, with
    the wire parameters (packed, buffer size, buffer count) the sender uses.
    """
    from vllm.distributed.weight_transfer.nccl_common import (
        NCCLWeightTransferInitInfo,
        worker_init_payload,
    )
    from vllm.distributed.weight_transfer.packed_tensor import (
        DEFAULT_PACKED_BUFFER_SIZE_BYTES,
        DEFAULT_PACKED_NUM_BUFFERS,
    )

    info = NCCLWeightTransferInitInfo(
        master_address=master_address,
        master_port=master_port,
        rank_offset=rank_offset,
        world_size=world_size,
        packed=NCCL_PACKED,
        packed_buffer_size_bytes=DEFAULT_PACKED_BUFFER_SIZE_BYTES,
        packed_num_buffers=DEFAULT_PACKED_NUM_BUFFERS,
    )
    return worker_init_payload(info)


@dataclass(frozen=True)
class WeightMeta:
    """What one broadcast carries, in send order: HF parameter names, wire dtype names, shapes.

    The receivers size their buffers (and cut the packed stream into chunks) from this, so it
    must match the sender's tensors exactly; the sender checks every tensor against it.
    """

    names: tuple[str, ...]
    dtype_names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if not self.names:
            raise EngineError("a weight push must carry at least one tensor")
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise EngineError(
                f"weight metadata lengths differ: {len(self.names)} names, "
                f"{len(self.dtype_names)} dtypes, {len(self.shapes)} shapes"
            )
        if len(set(self.names)) != len(self.names):
            raise EngineError("weight metadata repeats a parameter name")
        bad = sorted(set(self.dtype_names) - set(WIRE_DTYPES))
        if bad:
            raise EngineError(f"unsupported wire dtypes {bad}; expected {sorted(WIRE_DTYPES)}")

    @property
    def num_bytes(self) -> int:
        return sum(
            math.prod(shape) * WIRE_DTYPES[d].itemsize
            for d, shape in zip(self.dtype_names, self.shapes, strict=True)
        )


class _StagedWeights(WeightSource):
    """The learner's exported tensors, handed to vLLM's trainer engine as its ``WeightSource``.

    Staged as exported (CPU float32 from DeepSpeed, or CUDA); each tensor is moved to the
    sender's device and cast to the wire dtype only when the packed producer reaches it, so
    the extra GPU memory is one packed chunk, not a second copy of the model.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._named: list[tuple[str, torch.Tensor]] = []

    def stage(self, named_tensors: list[tuple[str, torch.Tensor]]) -> WeightMeta:
        for name, tensor in named_tensors:
            if not isinstance(tensor, torch.Tensor):
                raise EngineError(f"weight {name!r} is a {type(tensor).__name__}, not a tensor")
            if not tensor.is_floating_point():
                raise EngineError(f"weight {name!r} has non-float dtype {tensor.dtype}")
        wire = str(self.dtype).split(".")[-1]
        meta = WeightMeta(
            names=tuple(name for name, _ in named_tensors),
            dtype_names=(wire,) * len(named_tensors),
            shapes=tuple(tuple(t.shape) for _, t in named_tensors),
        )
        self._named = list(named_tensors)
        return meta

    def clear(self) -> None:
        self._named = []

    def __bool__(self) -> bool:
        return bool(self._named)

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, self.dtype, tuple(t.shape)) for name, t in self._named]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._named:
            yield name, tensor.to(device=self.device, dtype=self.dtype).contiguous()


class _DriverControlledClient:
    """A ``VLLMWeightSyncClient`` whose calls do nothing: the caller drives the samplers.

    vLLM's trainer engine normally calls the inference side itself. Here the driver makes one
    Ray call per side, each with its own timeout, so a stuck side is named instead of hanging
    the learner. The init payload vLLM would have sent is recorded, to check that the
    receivers were told the same wire parameters.
    """

    def __init__(self) -> None:
        self.init_payload: dict | None = None

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.init_payload = dict(init_info)

    def start_weight_update(self) -> None:
        pass

    def update_weights(self, update_info) -> None:
        pass

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        pass


class NcclWeightSender:
    """Rank 0 of the NCCL weight group, in the learner's rank-0 process (which needs a GPU).

    ``__init__`` blocks until every receiver has joined (vLLM's TCPStore rendezvous waits up
    to 300 s), so it must run concurrently with ``NcclWeightReceiver`` on every engine.
    dtype: wire dtype (the samplers' engine dtype); tensors are cast to it before sending.
    """

    def __init__(
        self, master_address: str, master_port: int, world_size: int, *, dtype: str = "float32"
    ) -> None:
        _check_group_args(master_address, master_port, world_size)
        wire = _wire_dtype(dtype)
        if not nccl_available():
            raise EngineError(
                "NcclWeightSender needs a CUDA GPU and the NCCL library in this process"
            )
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
        from vllm.distributed.weight_transfer.packed_tensor import (
            DEFAULT_PACKED_BUFFER_SIZE_BYTES,
            DEFAULT_PACKED_NUM_BUFFERS,
        )

        self._staged = _StagedWeights(
            torch.device("cuda", torch.accelerator.current_device_index()), wire
        )
        client = _DriverControlledClient()
        info = NCCLTrainerInitInfo(
            master_address=master_address,
            master_port=master_port,
            world_size=world_size,
            rank=0,
            packed=NCCL_PACKED,
            packed_buffer_size_bytes=DEFAULT_PACKED_BUFFER_SIZE_BYTES,
            packed_num_buffers=DEFAULT_PACKED_NUM_BUFFERS,
        )
        self._engine = WeightTransferTrainerFactory.trainer_init(
            info, client=client, source=self._staged
        )
        group = self._engine.model_update_group
        if group is None or group.disabled:
            self._engine.shutdown()
            raise EngineError("vLLM's NCCL communicator came up disabled; no weights would move")
        # Receivers were initialised from nccl_worker_init_payload (rank_offset 1 + i); vLLM's
        # trainer engine would have sent rank_offset 1 with the same wire parameters.
        expected = nccl_worker_init_payload(master_address, master_port, 1, world_size)
        if client.init_payload != expected:
            self._engine.shutdown()
            raise EngineError(
                f"wire parameters disagree: vLLM's trainer engine sends {client.init_payload}, "
                f"the receivers were initialised with {expected}"
            )
        self.world_size = world_size

    def stage(self, named_tensors: list[tuple[str, torch.Tensor]]) -> WeightMeta:
        """Keep ``(HF name, tensor)`` pairs for the next ``send_staged``; returns their metadata."""
        return self._staged.stage(named_tensors)

    def send_staged(self) -> float:
        """Broadcast the staged tensors (receivers must be in ``receive`` meanwhile); returns seconds."""
        if not self._staged:
            raise EngineError("nothing staged: call stage() (or send()) with the weights first")
        t0 = time.perf_counter()
        # Staged CUDA tensors may still be written on the default stream; the packed producer
        # reads them on its own streams.
        torch.cuda.current_stream().synchronize()
        try:
            self._engine.send_weights()
        finally:
            self._staged.clear()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Tear down the NCCL communicator (safe to call twice)."""
        self._engine.shutdown()


class NcclWeightReceiver:
    """A StudentEngine's end of the NCCL weight group (engine built with weight_transfer='nccl').

    ``__init__`` joins the group as rank ``rank_offset`` and blocks until every rank has
    joined, so it must run concurrently with ``NcclWeightSender`` and the other receivers.
    """

    def __init__(
        self,
        engine: StudentEngine,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
    ) -> None:
        _check_group_args(master_address, master_port, world_size)
        if not 1 <= rank_offset < world_size:
            raise EngineError(
                f"rank_offset must be in 1..{world_size - 1} (0 is the sender), got {rank_offset}"
            )
        if engine.settings.weight_transfer != "nccl":
            raise EngineError(
                f"engine on {engine.settings.model_path} was built with "
                f"weight_transfer={engine.settings.weight_transfer!r}; NCCL pushes need 'nccl'"
            )
        if engine.llm is None:
            raise EngineError("engine is closed")
        self.engine = engine
        payload = nccl_worker_init_payload(master_address, master_port, rank_offset, world_size)
        engine.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=payload))

    def receive(self, meta: WeightMeta, version: int) -> float:
        """Receive one broadcast into the engine and serve ``version`` from now on; returns seconds."""
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

        engine = self.engine
        if version <= engine.version:
            raise EngineError(f"weight version {version} is not newer than {engine.version}")
        if engine.llm is None:
            raise EngineError("engine is closed")
        update = NCCLWeightTransferUpdateInfo(
            names=list(meta.names),
            dtype_names=list(meta.dtype_names),
            shapes=[list(s) for s in meta.shapes],
        )
        t0 = time.perf_counter()
        llm = engine.llm
        llm.start_weight_update()
        llm.update_weights(WeightTransferUpdateRequest(update_info=asdict(update)))
        llm.finish_weight_update(weight_version=str(version))
        # Cached KV blocks were computed by the old weights; reusing them would mix policies.
        if (
            llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
            and not llm.reset_prefix_cache()
        ):
            raise EngineError("weights updated but the prefix cache could not be reset")
        engine.version = version
        return time.perf_counter() - t0

    def close(self) -> None:
        """Leave the NCCL group; the engine keeps serving its current weights."""
        if self.engine.llm is not None:
            self.engine.llm.shutdown_weight_transfer_engine()
