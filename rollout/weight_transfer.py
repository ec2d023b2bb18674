"""Weight transfer into running student engines over a collective: NCCL (GPU) or gloo (CPU).

vLLM's weight-transfer layer (``vllm.distributed.weight_transfer``) is the data plane: its
factories build a trainer-side engine (learner rank 0, ``WeightSender``) and a worker-side
engine inside each student engine (``WeightReceiver``), both chosen by backend name. "nccl" is
vLLM's own; "gloo" is registered here (``register_gloo_engines``) and is the NCCL engine pair
with the communicator swapped for a ``torch.distributed`` gloo group, so on CPU the same path
runs — group formation, init / start / update / finish calls, the packed broadcast, versions.

This module is imported by the learner's rank 0 and by the sampler actors; it does not import
vLLM's ``LLM`` engine, so a DeepSpeed rank never loads the inference engine. The object-store
path needs nothing from here: there tensors reach ``StudentEngine.load_weights``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    WeightSource,
    WeightTransferInitInfo,
    WeightTransferInitRequest,
    WeightTransferUpdateRequest,
)
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerWeightTransferEngine,
    NCCLWeightTransferEngine,
    NCCLWeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.packed_tensor import (
    DEFAULT_PACKED_BUFFER_SIZE_BYTES,
    DEFAULT_PACKED_NUM_BUFFERS,
    pack_tensors,
    unpack_tensor,
)

from services.errors import EngineError

if TYPE_CHECKING:
    from rollout.engine import StudentEngine

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Packed broadcast (a few large calls instead of one per tensor). Both ends read these
# constants, so they cannot disagree; the sender also checks them against vLLM's own payload.
PACKED = True
# A gloo call that never meets its peer raises after this long (the control plane's deadline,
# rollout.sync_timeout_s, fires first; this only frees a blocked actor eventually).
GLOO_TIMEOUT_S = 600.0


# =================================================================================================
# One group per run: rank 0 is the learner's sender, ranks 1..N are the sampler engines (one
# worker each: no tensor or data parallelism inside an engine). Every push is a packed broadcast
# from rank 0: the sender runs vLLM's trainer engine, each receiver runs the worker-side engine
# through LLM.start_weight_update / update_weights / finish_weight_update. The control plane (who
# calls what, when, with which timeout) belongs to the caller — services.nccl_sync — so the
# learner never holds sampler handles.
#
# Nothing here touches CUDA at import time; on a CPU machine the NCCL entry points refuse with an
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


def gloo_available() -> bool:
    """True when torch.distributed has its gloo backend (every CPU and CUDA build of torch)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


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


# ================================================================ gloo: vLLM's NCCL pair, CPU wire


class GlooGroup:
    """A gloo process group of its own (a TCPStore hosted by rank 0), outside torch's default
    group — the learner rank and the vLLM worker each have a default group already.

    Answers the part of vLLM's ``PyNcclCommunicator`` the weight engines use (``broadcast``,
    ``destroy``); tensors are CPU tensors. Construction blocks until all ``world_size`` ranks
    have joined, or raises after ``timeout_s``.
    """

    def __init__(
        self, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float
    ) -> None:
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        self._store = dist.TCPStore(
            master_address,
            master_port,
            world_size,
            is_master=rank == 0,
            timeout=timeout,
            wait_for_workers=True,
        )
        self._group = dist.ProcessGroupGloo(self._store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        """In-place broadcast of a contiguous CPU tensor from group rank ``src``; synchronous."""
        import torch.distributed as dist

        del stream  # gloo runs on the host; there is no device stream to order against
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self._group.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        group, self._group = getattr(self, "_group", None), None
        if group is not None and hasattr(group, "shutdown"):
            group.shutdown()
        self._store = None


def packed_broadcast_producer(
    iterator: Iterator[tuple[str, torch.Tensor]], group: GlooGroup, buffer_size_bytes: int
) -> None:
    """vLLM's packed producer without CUDA streams: chunks cut by vLLM's ``pack_tensors``, so
    the boundaries are those ``packed_broadcast_consumer`` (and vLLM's consumer) expect."""
    while (chunk := pack_tensors(iterator, lambda item: item[1], buffer_size_bytes)) is not None:
        group.broadcast(chunk.packed_tensor, src=0)


def packed_broadcast_consumer(
    meta: Iterator[tuple[str, list[int], torch.dtype]],
    group: GlooGroup,
    load: Callable[[list[tuple[str, torch.Tensor]]], object],
    buffer_size_bytes: int,
) -> None:
    """vLLM's packed consumer without CUDA streams: a chunk ends at the first tensor that takes
    its size past ``buffer_size_bytes`` (the producer's rule); each chunk is received into a
    fresh buffer (vLLM's layerwise reload may keep views of it until the layer is complete)."""
    pending: list[tuple[str, list[int], torch.dtype, int]] = []
    size = 0
    for name, shape, dtype in meta:
        nbytes = math.prod(shape) * dtype.itemsize
        pending.append((name, shape, dtype, nbytes))
        size += nbytes
        if size > buffer_size_bytes:
            _receive_chunk(pending, size, group, load)
            pending, size = [], 0
    if pending:
        _receive_chunk(pending, size, group, load)


def _receive_chunk(pending, size: int, group: GlooGroup, load) -> None:
    packed = torch.empty(size, dtype=torch.uint8)
    group.broadcast(packed, src=0)
    names, shapes, dtypes, sizes = (list(x) for x in zip(*pending, strict=True))
    load(unpack_tensor(packed, names, shapes, dtypes, sizes))


@dataclass
class _GlooWire:
    """What both ends of a gloo group must agree on: the rendezvous and the packing."""

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = GLOO_TIMEOUT_S
    packed: bool = PACKED
    packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES
    packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS


@dataclass
class GlooWeightTransferInitInfo(_GlooWire, WeightTransferInitInfo):
    """Worker-side init info of the gloo backend: the wire plus this engine's first rank."""

    rank_offset: int = field(kw_only=True)


@dataclass
class GlooTrainerInitInfo(_GlooWire, TrainerInitInfo):
    """Trainer-side init info of the gloo backend; ``backend`` is the factory key."""

    backend: ClassVar[str] = "gloo"
    rank: int = field(default=0, kw_only=True)


def gloo_worker_init_payload(info: GlooTrainerInitInfo, rank_offset: int) -> dict:
    """The ``init_info`` dict a receiver at ``rank_offset`` is initialised with (the trainer's
    wire parameters, so the two ends cannot disagree)."""
    wire = {k: v for k, v in asdict(info).items() if k != "rank"}
    return asdict(GlooWeightTransferInitInfo(**wire, rank_offset=rank_offset))


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's worker-side NCCL engine over a gloo group: the same update lifecycle (layerwise
    reload in start / finish, ``model.load_weights`` per chunk), received on the host."""

    init_info_cls = GlooWeightTransferInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:
        self.packed = init_info.packed
        self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
        self.packed_num_buffers = init_info.packed_num_buffers
        # The same rank arithmetic as vLLM's worker_init_process_group.
        pc = self.parallel_config
        rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.model_update_group = GlooGroup(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            init_info.timeout_s,
        )

    def update_weights(self, update_info: dict) -> None:
        # The base class ends with torch.accelerator.synchronize(), which raises without a
        # device; gloo's broadcast has returned with the bytes on the host.
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        if self.model_update_group is None:
            raise RuntimeError("gloo weight transfer not initialized; call init first")
        from vllm.model_executor.model_loader.mtp_validation import (
            disable_mtp_completeness_check,
        )

        meta = zip(
            update_info.names,
            update_info.shapes,
            (getattr(torch, d) for d in update_info.dtype_names),
            strict=True,
        )
        group = self.model_update_group
        with disable_mtp_completeness_check():
            if self.packed:
                packed_broadcast_consumer(
                    meta, group, self.model.load_weights, self.packed_buffer_size_bytes
                )
            else:
                for name, shape, dtype in meta:
                    weight = torch.empty(shape, dtype=dtype)
                    group.broadcast(weight, src=0)
                    self.model.load_weights([(name, weight)])


class GlooTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """vLLM's trainer-side NCCL engine over a gloo group: the same ``send_weights`` round trip
    (client start → update concurrently with the broadcast → finish), sent from the host."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None):
        if source is None:
            raise ValueError("gloo trainer weight transfer requires a WeightSource.")
        engine = cls(
            client=client,
            source=source,
            is_sender=init_info.is_sender,
            packed=init_info.packed,
            packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
            packed_num_buffers=init_info.packed_num_buffers,
        )
        if not engine.is_sender:
            return engine
        # As vLLM's NCCL trainer: the workers block in init until rank 0 opens the group.
        with ThreadPoolExecutor(max_workers=1) as exe:
            future = exe.submit(
                engine.client.init_weight_transfer_engine,
                gloo_worker_init_payload(init_info, rank_offset=1),
            )
            engine.model_update_group = GlooGroup(
                init_info.master_address,
                init_info.master_port,
                0,
                init_info.world_size,
                init_info.timeout_s,
            )
            future.result()
        return engine

    def _broadcast(self, source: WeightSource, meta: list[ParamMeta]) -> None:
        if not self.is_sender:
            for _ in source:
                pass
            return
        pairs = self._checked_iter(source, meta)
        if self.packed:
            packed_broadcast_producer(pairs, self.model_update_group, self.packed_buffer_size_bytes)
        else:
            for _name, tensor in pairs:
                self.model_update_group.broadcast(tensor.contiguous(), src=0)

    def _post_send_sync(self) -> None:
        pass  # gloo's broadcast returns once the bytes are sent; nothing is left in flight


def register_gloo_engines() -> None:
    """Register the gloo pair with vLLM's weight-transfer factories (idempotent).

    Runs when this module is imported. vLLM builds the worker-side engine in ``Worker.load_model``
    (``WeightTransferEngineFactory.create_engine``), in whatever process runs the worker;
    ``WorkerWrapperBase.init_worker`` imports the ``worker_extension_cls`` module
    (``rollout.engine``, which imports this one) in that same process before it, so the
    registration reaches a worker in-process and in a subprocess alike, with no install step.
    """
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    for factory, cls in (
        (WeightTransferEngineFactory, GlooWeightTransferEngine),
        (WeightTransferTrainerFactory, GlooTrainerWeightTransferEngine),
    ):
        # vLLM has no lookup API; its registry maps a name to a loader of the class.
        loader = factory._registry.get("gloo")
        if loader is None:
            factory.register_engine("gloo", cls)
        elif loader().__qualname__ != cls.__qualname__:
            raise EngineError(
                f"vLLM already registers a 'gloo' weight-transfer engine ({loader()}); "
                f"opdplus's {cls.__name__} would shadow it"
            )


register_gloo_engines()


# ======================================================================== the backends, by name


@dataclass(frozen=True)
class Backend:
    """One collective weight-transfer backend: where it can run and how its ends are built.

    trainer_info(address, port, world_size) -> the ``TrainerInitInfo`` vLLM's trainer factory
    dispatches on; worker_payload(trainer_info, rank_offset) -> the receiver's ``init_info``.
    """

    name: str
    available: Callable[[], bool]
    needs: str
    sender_device: Callable[[], torch.device]
    trainer_info: Callable[[str, int, int], TrainerInitInfo]
    worker_payload: Callable[[TrainerInitInfo, int], dict]


def _nccl_trainer_info(master_address: str, master_port: int, world_size: int):
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    return NCCLTrainerInitInfo(
        master_address=master_address,
        master_port=master_port,
        world_size=world_size,
        rank=0,
        packed=PACKED,
        packed_buffer_size_bytes=DEFAULT_PACKED_BUFFER_SIZE_BYTES,
        packed_num_buffers=DEFAULT_PACKED_NUM_BUFFERS,
    )


def _nccl_worker_payload(info, rank_offset: int) -> dict:
    return nccl_worker_init_payload(
        info.master_address, info.master_port, rank_offset, info.world_size
    )


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

    info = NCCLWeightTransferInitInfo(
        master_address=master_address,
        master_port=master_port,
        rank_offset=rank_offset,
        world_size=world_size,
        packed=PACKED,
        packed_buffer_size_bytes=DEFAULT_PACKED_BUFFER_SIZE_BYTES,
        packed_num_buffers=DEFAULT_PACKED_NUM_BUFFERS,
    )
    return worker_init_payload(info)


BACKENDS: dict[str, Backend] = {
    "nccl": Backend(
        name="nccl",
        available=nccl_available,
        needs="a CUDA GPU and the NCCL library",
        sender_device=lambda: torch.device("cuda", torch.accelerator.current_device_index()),
        trainer_info=_nccl_trainer_info,
        worker_payload=_nccl_worker_payload,
    ),
    "gloo": Backend(
        name="gloo",
        available=gloo_available,
        needs="torch.distributed with gloo",
        sender_device=lambda: torch.device("cpu"),
        trainer_info=lambda address, port, world_size: GlooTrainerInitInfo(
            master_address=address, master_port=port, world_size=world_size
        ),
        worker_payload=gloo_worker_init_payload,
    ),
}


def collective_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise EngineError(
            f"weight-transfer backend must be one of {sorted(BACKENDS)}, got {name!r}"
        )
    return BACKENDS[name]


# ==================================================================== what a broadcast carries


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
    the extra memory is one packed chunk, not a second copy of the model.
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


class WeightSender:
    """Rank 0 of the weight group, in the learner's rank-0 process (NCCL: needs a GPU).

    ``__init__`` blocks until every receiver has joined (the TCPStore rendezvous), so it must
    run concurrently with ``WeightReceiver`` on every engine.
    backend: "nccl" or "gloo" (``BACKENDS``). dtype: wire dtype (the samplers' engine dtype);
    tensors are cast to it before sending.
    """

    def __init__(
        self,
        master_address: str,
        master_port: int,
        world_size: int,
        *,
        backend: str = "nccl",
        dtype: str = "float32",
    ) -> None:
        _check_group_args(master_address, master_port, world_size)
        wire = _wire_dtype(dtype)
        spec = collective_backend(backend)
        if not spec.available():
            raise EngineError(f"the {backend} weight sender needs {spec.needs} in this process")
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        self.backend = backend
        self._staged = _StagedWeights(spec.sender_device(), wire)
        client = _DriverControlledClient()
        info = spec.trainer_info(master_address, master_port, world_size)
        self._engine = WeightTransferTrainerFactory.trainer_init(
            info, client=client, source=self._staged
        )
        group = self._engine.model_update_group
        if group is None or getattr(group, "disabled", False):
            self._engine.shutdown()
            raise EngineError(
                f"vLLM's {backend} communicator came up disabled; no weights would move"
            )
        # Receivers were initialised from spec.worker_payload (rank_offset 1 + i); vLLM's
        # trainer engine would have sent rank_offset 1 with the same wire parameters.
        expected = spec.worker_payload(info, 1)
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
            raise EngineError("nothing staged: call stage() with the weights first")
        t0 = time.perf_counter()
        if self._staged.device.type == "cuda":
            # Staged CUDA tensors may still be written on the default stream; the packed
            # producer reads them on its own streams.
            torch.cuda.current_stream().synchronize()
        try:
            self._engine.send_weights()
        finally:
            self._staged.clear()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Tear down the communicator (safe to call twice)."""
        self._engine.shutdown()


class WeightReceiver:
    """A StudentEngine's end of the weight group (engine built with weight_transfer = backend).

    ``__init__`` joins the group as rank ``rank_offset`` and blocks until every rank has
    joined, so it must run concurrently with ``WeightSender`` and the other receivers.
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
        backend = engine.settings.weight_transfer
        if backend not in BACKENDS:
            raise EngineError(
                f"engine on {engine.settings.model_path} was built with "
                f"weight_transfer={backend!r}; collective pushes need one of {sorted(BACKENDS)}"
            )
        if engine.llm is None:
            raise EngineError("engine is closed")
        self.engine = engine
        self.backend = backend
        spec = BACKENDS[backend]
        info = spec.trainer_info(master_address, master_port, world_size)
        payload = spec.worker_payload(info, rank_offset)
        engine.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=payload))

    def receive(self, meta: WeightMeta, version: int, *, repeat: bool = False) -> float:
        """Receive one broadcast into the engine and serve ``version`` from now on; returns seconds.

        repeat: the push repeats ``version`` for a re-formed group (a replacement joined); an
        engine that already serves it receives the same weights again."""
        engine = self.engine
        if version < engine.version or (version == engine.version and not repeat):
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
        """Leave the group; the engine keeps serving its current weights."""
        if self.engine.llm is not None:
            self.engine.llm.shutdown_weight_transfer_engine()
