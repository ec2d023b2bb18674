"""vLLM engines: the student sampler and the teacher scorer. The only module that imports vLLM.

On CPU the engine runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
weight pushes hand real tensors to the model runner (no serialisation, no files). On GPU the
same classes run the official vLLM build; weight pushes there go through vLLM's native weight
transfer (NCCL broadcast) — see ``NcclWeightReceiver`` and ``learner.export``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout.alignment import response_positions

# Must be set before vLLM is imported: keeps the engine core in this process so that
# collective_rpc arguments (weight tensors) are passed by reference instead of msgpack lists.
if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402


class EngineError(RuntimeError):
    """An engine could not start or failed a request; the message says which model and why."""


@dataclass(frozen=True)
class EngineSettings:
    """How one vLLM engine is built.

    kv_cache_mb: KV-cache size on CPU, in MiB (an explicit size: vLLM's fraction-of-RAM rule
    subtracts the whole process's memory, which fails when the engine runs inside an actor).
    kv_cache_fraction: vLLM's gpu_memory_utilization, used on GPU only.
    """

    model_path: str
    dtype: str = "float32"
    seed: int = 0
    kv_cache_mb: int = 256
    kv_cache_fraction: float = 0.3
    max_model_len: int = 256
    enforce_eager: bool = True
    max_num_seqs: int = 256


@dataclass(frozen=True)
class Generation:
    """One sampled completion: token ids [R], log π_sampler of each [R], and why it ended."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str


class WeightLoaderExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``): loads pushed weights in place.

    ``reload_weights`` (not ``model.load_weights``) because the CPU backend repacks weights
    after loading; reload re-runs that processing.
    """

    def opdplus_reload_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors))
        return len(named_tensors)


def _check_settings(s: EngineSettings) -> None:
    path = Path(s.model_path)
    if not (path / "config.json").is_file():
        raise EngineError(f"model folder {path} has no config.json (expected a Hugging Face folder)")
    if not 0 < s.kv_cache_fraction < 1:
        raise EngineError(f"kv_cache_fraction must be in (0, 1), got {s.kv_cache_fraction}")
    if not torch.cuda.is_available():
        want = s.kv_cache_mb * 2**20
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if want > avail:
            raise EngineError(
                f"kv_cache_mb {s.kv_cache_mb} asks for {want / 2**30:.1f} GiB of RAM but only "
                f"{avail / 2**30:.1f} GiB is free; lower rollout.kv_cache_mb"
            )


def _memory_kwargs(s: EngineSettings) -> dict:
    if torch.cuda.is_available():
        return {"gpu_memory_utilization": s.kv_cache_fraction}
    return {"kv_cache_memory_bytes": s.kv_cache_mb * 2**20}


class _Engine:
    def __init__(self, settings: EngineSettings) -> None:
        _check_settings(settings)
        self.settings = settings
        try:
            self.llm = LLM(
                model=settings.model_path,
                tokenizer=settings.model_path,
                skip_tokenizer_init=True,
                dtype=settings.dtype,
                seed=settings.seed,
                **_memory_kwargs(settings),
                max_model_len=settings.max_model_len,
                max_num_seqs=settings.max_num_seqs,
                enforce_eager=settings.enforce_eager,
                # Stale KV blocks after a weight push would silently mix policies.
                enable_prefix_caching=False,
                worker_extension_cls="rollout.engine.WeightLoaderExtension",
            )
        except Exception as exc:  # vLLM raises many types; report which model and why
            raise EngineError(f"vLLM could not start on {settings.model_path}: {exc}") from exc

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) if engine is not None else None
            if callable(shutdown):
                shutdown()
            self.llm = None

    def _check_lengths(self, seqs: list[list[int]], extra: int) -> None:
        limit = self.settings.max_model_len
        for i, ids in enumerate(seqs):
            if len(ids) + extra > limit:
                raise EngineError(
                    f"sequence {i} has {len(ids)} tokens (+{extra}) > max_model_len {limit}"
                )


class StudentEngine(_Engine):
    """Samples completions and records log π_sampler of each sampled token."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        self.version = 0

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        """Sample ``n`` completions per prompt. temperature 0 = greedy (n must be 1).

        Returns one list of ``n`` Generations per prompt, in prompt order. The recorded
        log-probs are of the model's raw (temperature-1) distribution, which is what the
        learner recomputes.
        """
        if temperature == 0 and n != 1:
            raise EngineError("greedy decoding (temperature 0) with n > 1 would repeat one sample")
        self._check_lengths(prompt_ids, 1)
        params = SamplingParams(
            n=n,
            temperature=temperature,
            max_tokens=max_tokens,
            logprobs=0,
            seed=seed,
            detokenize=False,
        )
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[_to_generation(c) for c in out.outputs] for out in outputs]

    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> float:
        """Load learner weights in place and serve ``version`` from now on; returns seconds."""
        if version <= self.version:
            raise EngineError(f"weight version {version} is not newer than {self.version}")
        t0 = time.perf_counter()
        self.llm.collective_rpc("opdplus_reload_weights", args=(named_tensors,))
        self.version = version
        return time.perf_counter() - t0

    def load_weights_from_file(self, path: str, version: int) -> float:
        """Same as load_weights, reading a safetensors file (used when tensors cannot be passed)."""
        from safetensors.torch import load_file

        return self.load_weights(list(load_file(path).items()), version)


def _to_generation(completion) -> Generation:
    ids = tuple(completion.token_ids)
    lps = []
    for tok, entry in zip(ids, completion.logprobs or [], strict=True):
        lps.append(float(entry[tok].logprob))
    finish = completion.finish_reason or "length"
    if finish not in ("stop", "length"):
        finish = "abort"
    return Generation(token_ids=ids, logprobs=tuple(lps), finish_reason=finish)


class TeacherEngine(_Engine):
    """Scores given token sequences: log π_teacher of each response token (temperature 1)."""

    def score(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> list[list[float]]:
        """log π_T(y_t | x, y_<t) for each response token; one list per sequence.

        Uses prompt_logprobs on prompt+response (position 0 has none); the response span is
        cut by ``rollout.alignment.response_positions``.
        """
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        self._check_lengths(seqs, 1)
        params = SamplingParams(
            max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False
        )
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False
        )
        scores = []
        for seq, p, r, out in zip(seqs, prompt_ids, response_ids, outputs, strict=True):
            per_pos = out.prompt_logprobs
            if per_pos is None or len(per_pos) != len(seq):
                raise EngineError(f"teacher returned no prompt log-probs for a {len(seq)}-token sequence")
            span = response_positions(len(p), len(r))
            lps = [float(per_pos[i][seq[i]].logprob) for i in range(span.start, span.stop)]
            if not all(math.isfinite(x) for x in lps):
                raise EngineError("teacher returned a non-finite log-prob")
            scores.append(lps)
        return scores
