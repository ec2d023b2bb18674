"""vLLM engines: the student sampler and the teacher scorer. The only module that imports vLLM's
engine (``rollout.weight_transfer`` imports its weight-transfer classes alone).

On CPU the engine runs inside the calling process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
weight pushes hand real tensors to the model runner (no serialisation, no files). On GPU the
same classes run the official vLLM build; weight pushes there go through vLLM's native weight
transfer (NCCL broadcast) — see ``rollout.weight_transfer``.

Padding rows: vLLM scores every row of the output layer (config.json's vocab_size), also rows
beyond the tokenizer's ids, and would sample them and normalise every log-prob over them. When
the layer has such rows, each engine slices the model's logits to the tokenizer's ids
(``WeightLoaderExtension.opdplus_keep_logits``), before the sampler and the prompt log-probs
see them (docs/math.md §6, "Padding rows").
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checks import tokenizer_length
from rollout.alignment import response_positions
from rollout.records import TeacherScore
from services.errors import EngineError

# Must be set before vLLM is imported: keeps the engine core in this process so that
# collective_rpc arguments (weight tensors) are passed by reference instead of msgpack lists.
if not torch.cuda.is_available():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from vllm import LLM, PoolingParams, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.transformers_utils.config import try_get_dense_modules  # noqa: E402

# Importing rollout.weight_transfer registers the "gloo" weight-transfer engines with vLLM. The
# worker imports this module (worker_extension_cls) before it builds its transfer engine, so the
# registration holds in the worker's process whether it is this one or a subprocess.
from rollout.weight_transfer import BACKENDS as COLLECTIVE_BACKENDS  # noqa: E402


@dataclass(frozen=True)
class EngineSettings:
    """How one vLLM engine is built.

    kv_cache_mb: KV-cache size on CPU, in MiB (an explicit size: vLLM's fraction-of-RAM rule
    subtracts the whole process's memory, which fails when the engine runs inside an actor).
    kv_cache_fraction: vLLM's gpu_memory_utilization, used on GPU only.
    weight_transfer: "none" (weights arrive through ``load_weights``), "nccl" (vLLM's NCCL
    weight-transfer engine is built into the worker; GPU only) or "gloo" (the same engine over
    a gloo group, on CPU); see ``rollout.weight_transfer.WeightReceiver``.
    teacher_topk: TeacherEngine only: K > 0 also returns the teacher's top-K token ids and
    log-probs at every response position (dense OPD+, learner/dense.py); 0 = sampled token only;
    "full": ``teacher_engine()`` builds a ``TeacherHiddenEngine`` (hidden states, no log-probs).
    teacher_temperature: TeacherEngine only: τ_T > 0; scores log softmax(logits / τ_T).
    """

    model_path: str
    dtype: str = "float32"
    seed: int = 0
    kv_cache_mb: int = 256
    kv_cache_fraction: float = 0.3
    max_model_len: int = 256
    enforce_eager: bool = True
    max_num_seqs: int = 256
    weight_transfer: str = "none"
    teacher_topk: int | str = 0
    teacher_temperature: float = 1.0

    # The sampler and scorer build their engine through these, so a spec that wraps them
    # (tests/fault_engines.py, bench/common.py) changes an engine's behaviour from outside.
    def student_engine(self) -> StudentEngine:
        return StudentEngine(self)

    def teacher_engine(self) -> TeacherEngine | TeacherHiddenEngine:
        if self.teacher_topk == "full":
            return TeacherHiddenEngine(self)
        return TeacherEngine(self)


@dataclass(frozen=True)
class Generation:
    """One sampled completion: token ids [R], log π_sampler of each [R], and why it ended
    (stop_string: the ``stop`` string it ended at, included in token_ids; else None)."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    finish_reason: str
    stop_string: str | None = None


class WeightLoaderExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``): loads pushed weights in place.

    ``reload_weights`` (not ``model.load_weights``) because the CPU backend repacks weights
    after loading; reload re-runs that processing.
    """

    def opdplus_reload_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        self.model_runner.reload_weights(weights_iterator=iter(named_tensors))
        return len(named_tensors)

    def opdplus_keep_logits(self, rows: int) -> int:
        # The output layer may have more rows than the tokenizer has tokens (padding rows, e.g.
        # Qwen's 151936 for 151665 tokens) and vLLM scores them all: a sample could draw a
        # padding id and every log-prob (sampled, prompt, top-K) would be normalised over them.
        # Slicing the logits the model hands on (sampler and prompt log-probs alike) to the
        # first `rows` columns makes the policy softmax over the real tokens (docs/math.md).
        processor = getattr(self.model_runner.get_model(), "logits_processor", None)
        if processor is None:
            raise RuntimeError("the model has no logits_processor to slice its logits")
        old = getattr(processor, "opdplus_keep_hook", None)
        if old is not None:
            old.remove()

        def keep(_module, _args, logits):
            if logits is None or logits.shape[-1] <= rows:
                return logits
            # Contiguous: vLLM's CPU sampling kernels read the rows as dense.
            return logits[..., :rows].contiguous()

        processor.opdplus_keep_hook = processor.register_forward_hook(keep)
        return rows

    def opdplus_scale_logits(self, factor: float) -> float:
        # Prompt log-probs bypass the sampler, so a request's temperature never reaches them;
        # scaling the logits themselves (vLLM's logit_scale) makes them log softmax(z · factor).
        processor = getattr(self.model_runner.get_model(), "logits_processor", None)
        if processor is None or not hasattr(processor, "scale"):
            raise RuntimeError("the model has no logits_processor.scale to apply a temperature")
        processor.scale = processor.scale * factor
        return processor.scale


def _check_settings(s: EngineSettings) -> None:
    path = Path(s.model_path)
    if not (path / "config.json").is_file():
        raise EngineError(
            f"model folder {path} has no config.json (expected a Hugging Face folder)"
        )
    if not 0 < s.kv_cache_fraction < 1:
        raise EngineError(f"kv_cache_fraction must be in (0, 1), got {s.kv_cache_fraction}")
    if not s.teacher_temperature > 0:
        raise EngineError(f"teacher_temperature must be > 0, got {s.teacher_temperature}")
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
    # No chunked prefill on CPU: when a prompt's prefill is split, vLLM 0.32 rewinds the seeded
    # request's torch.Generator with get_offset(), which CPU generators do not support
    # ("CPU Generator does not use offset") and the engine dies.
    return {"kv_cache_memory_bytes": s.kv_cache_mb * 2**20, "enable_chunked_prefill": False}


def _start_llm(settings: EngineSettings, **kwargs):
    """vLLM's LLM on ``settings`` (model, dtype, seed, memory, lengths) plus ``kwargs``; an
    EngineError naming the model when it cannot start."""
    try:
        return LLM(
            model=settings.model_path,
            tokenizer=settings.model_path,
            dtype=settings.dtype,
            seed=settings.seed,
            **_memory_kwargs(settings),
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enforce_eager=settings.enforce_eager,
            # Stale KV blocks after a weight push would silently mix policies; a scorer has
            # nothing to reuse across distinct samples.
            enable_prefix_caching=False,
            **kwargs,
        )
    except Exception as exc:  # vLLM raises many types; report which model and why
        raise EngineError(f"vLLM could not start on {settings.model_path}: {exc}") from exc


class _Engine:
    def __init__(self, settings: EngineSettings) -> None:
        _check_settings(settings)
        self.settings = settings
        self.llm = _start_llm(
            settings,
            # vLLM refuses prompt_logprobs above max_logprobs (default 20).
            max_logprobs=max(20, settings.teacher_topk),
            worker_extension_cls="rollout.engine.WeightLoaderExtension",
            # A sampled token's log-prob under the distribution it was drawn from
            # (softmax(logits / temperature)), not the raw temperature-1 one.
            logprobs_mode="processed_logprobs",
            **_weight_transfer_kwargs(settings.weight_transfer),
        )
        try:
            self.vocab_size = self._keep_real_tokens()
        except Exception:
            self.close()
            raise

    def _keep_real_tokens(self) -> int:
        """Slice the logits to the tokenizer's ids when the output layer has padding rows;
        returns the number of real ids (`models.checks.tokenizer_length`)."""
        path = Path(self.settings.model_path)
        rows = self.llm.llm_engine.model_config.get_vocab_size()
        seen = self.llm.get_tokenizer().max_token_id + 1  # vLLM's own count
        tokens = tokenizer_length(path) if (path / "tokenizer.json").is_file() else seen
        if not seen <= tokens <= rows:
            raise EngineError(
                f"{path}: its tokenizer has {tokens} token ids (vLLM counts {seen}) for an output "
                f"layer of {rows} rows (config.json vocab_size); expected one row per token"
            )
        if self.settings.teacher_topk > tokens:
            raise EngineError(
                f"teacher_topk {self.settings.teacher_topk} exceeds the {tokens} token ids of "
                f"{path}'s tokenizer"
            )
        if tokens < rows:
            self.llm.collective_rpc("opdplus_keep_logits", args=(tokens,))
        return tokens

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
        max_tokens: int | Sequence[int],
        temperature: float = 1.0,
        n: int = 1,
        seed: int | Sequence[int] | None = None,
        stop: tuple[str, ...] = (),
    ) -> list[list[Generation]]:
        """Sample ``n`` completions per prompt. temperature 0 = greedy (n must be 1).
        max_tokens, seed, stop: as ``generate_stream``.

        Returns one list of ``n`` Generations per prompt, in prompt order.
        """
        results: list[list[Generation] | None] = [None] * len(prompt_ids)
        for index, gens in self.generate_stream(
            prompt_ids, max_tokens=max_tokens, temperature=temperature, n=n, seed=seed, stop=stop
        ):
            results[index] = gens
        return results  # type: ignore[return-value]

    def generate_stream(
        self,
        prompt_ids: list[list[int]],
        *,
        max_tokens: int | Sequence[int],
        temperature: float = 1.0,
        n: int = 1,
        seed: int | Sequence[int] | None = None,
        stop: tuple[str, ...] = (),
    ) -> Iterator[tuple[int, list[Generation]]]:
        """Like ``generate`` but yields ``(prompt_index, generations)`` as each prompt finishes.

        max_tokens, seed: one for all prompts (prompt i is seeded ``seed + i``) or one per
        prompt. stop: strings that end a completion (an episode's tool call, rollout/episodes.py),
        kept in its tokens; ``Generation.stop_string`` says which one ended it.

        All prompts are batched in one engine run; a prompt whose samples are done is handed
        on at once (to be scored) instead of waiting for the slowest prompt of the batch.
        The recorded log-probs are of the distribution actually sampled from,
        log softmax(logits / temperature) (greedy: temperature 1); the learner recomputes its
        log-probs at the same temperature.
        """
        if temperature == 0 and n != 1:
            raise EngineError("greedy decoding (temperature 0) with n > 1 would repeat one sample")
        self._check_lengths(prompt_ids, 1)
        count = len(prompt_ids)
        limits = [max_tokens] * count if isinstance(max_tokens, int) else list(max_tokens)
        # One seed per prompt keeps a prompt's samples independent of batch order.
        if seed is None or isinstance(seed, int):
            seeds = [None if seed is None else seed + i for i in range(count)]
        else:
            seeds = list(seed)
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                max_tokens=limit,
                logprobs=0,
                seed=one_seed,
                # vLLM matches stop strings on the detokenized text only.
                detokenize=bool(stop),
                stop=list(stop) or None,
                include_stop_str_in_output=bool(stop),
            )
            for limit, one_seed in zip(limits, seeds, strict=True)
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        request_ids = self.llm.enqueue(prompts, params, use_tqdm=False)
        # enqueue returns '<n>-<suffix>'; finished outputs carry the bare '<n>'.
        index_of = {rid.split("-", 1)[0]: i for i, rid in enumerate(request_ids)}
        engine = self.llm.llm_engine
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    yield index_of[out.request_id], [_to_generation(c) for c in out.outputs]

    def load_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> float:
        """Load learner weights in place and serve ``version`` from now on; returns seconds."""
        if version <= self.version:
            raise EngineError(f"weight version {version} is not newer than {self.version}")
        t0 = time.perf_counter()
        self.llm.collective_rpc("opdplus_reload_weights", args=(named_tensors,))
        self.version = version
        return time.perf_counter() - t0


def _to_generation(completion) -> Generation:
    ids = tuple(completion.token_ids)
    lps = []
    for tok, entry in zip(ids, completion.logprobs or [], strict=True):
        lps.append(float(entry[tok].logprob))
    finish = completion.finish_reason or "length"
    if finish not in ("stop", "length"):
        finish = "abort"
    # stop_reason is the stop string, a stop token id, or None (EOS).
    reason = completion.stop_reason if isinstance(completion.stop_reason, str) else None
    return Generation(token_ids=ids, logprobs=tuple(lps), finish_reason=finish, stop_string=reason)


class TeacherEngine(_Engine):
    """Scores given token sequences: log π_teacher of each response token, at the temperature
    ``settings.teacher_temperature`` (default 1)."""

    def __init__(self, settings: EngineSettings) -> None:
        super().__init__(settings)
        if settings.teacher_temperature != 1.0:
            self.llm.collective_rpc(
                "opdplus_scale_logits", args=(1.0 / settings.teacher_temperature,)
            )

    # The teacher's own completions (prompt-only evaluation: its greedy answers,
    # rollout/accuracy.py), as the student's; scaling the logits by 1/τ_T keeps the argmax.
    generate = StudentEngine.generate
    generate_stream = StudentEngine.generate_stream

    def score(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> list[TeacherScore]:
        """log π_T(y_t | x, y_<t) for each response token; one TeacherScore per sequence.

        Uses prompt_logprobs on prompt+response (position 0 has none); the response span is
        cut by ``rollout.alignment.response_positions``. With ``settings.teacher_topk`` = K > 0
        each score also carries the teacher's top-K ids and log-probs [R][K] (rank order).
        """
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        self._check_lengths(seqs, 1)
        k = self.settings.teacher_topk
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=s) for s in seqs], params, use_tqdm=False
        )
        scores = []
        for seq, p, r, out in zip(seqs, prompt_ids, response_ids, outputs, strict=True):
            per_pos = out.prompt_logprobs
            if per_pos is None or len(per_pos) != len(seq):
                raise EngineError(
                    f"teacher returned no prompt log-probs for a {len(seq)}-token sequence"
                )
            span = response_positions(len(p), len(r))
            lps = [float(per_pos[i][seq[i]].logprob) for i in range(span.start, span.stop)]
            if not all(math.isfinite(x) for x in lps):
                raise EngineError("teacher returned a non-finite log-prob")
            if k == 0:
                scores.append(TeacherScore(tuple(lps)))
                continue
            top = [_top_k(per_pos[i], seq[i], k) for i in range(span.start, span.stop)]
            scores.append(
                TeacherScore(
                    tuple(lps),
                    topk_ids=tuple(ids for ids, _ in top),
                    topk_logp=tuple(lp for _, lp in top),
                )
            )
        return scores


def _top_k(entry, token: int, k: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The teacher's top-k (ids, log-probs) at one position, in rank order.

    vLLM's prompt_logprobs=k returns the top-k PLUS the actual token (with its own rank). The
    support must be a function of the state only, so the actual token is dropped unless it is
    one of the top-k: with k + 1 entries it is the extra one (even when a tie gives it a rank
    <= k); with k entries it was among the top-k (its entry then carries a top-k rank).
    """
    items = dict(entry)
    if len(items) == k + 1:
        del items[token]
    if len(items) != k:
        raise EngineError(f"teacher returned {len(entry)} log-probs for top-{k} at a position")
    ranked = sorted(items.items(), key=lambda kv: kv[1].rank)
    logps = tuple(float(lp.logprob) for _, lp in ranked)
    if not all(math.isfinite(x) for x in logps):
        raise EngineError("teacher returned a non-finite top-k log-prob")
    return tuple(int(t) for t, _ in ranked), logps


class TeacherHiddenEngine(_Engine):
    """Scores given token sequences with the teacher's final hidden states (after the model's
    final norm, no output layer): the learner applies the teacher's own output layer to them.

    A vLLM pooling engine (``runner="pooling"``, ``convert="embed"``, task ``token_embed``):
    prefill only, the output layer is never built or run, and every position's hidden state
    comes back as one tensor per sequence. Normalisation is off (``use_activation=False``) and
    the pooler head keeps the engine's dtype (vLLM's pooling default casts to float32).
    Built from the same ``EngineSettings`` as ``TeacherEngine``; ``teacher_topk`` and
    ``teacher_temperature`` do not apply here (the learner applies τ_T to its logits) and
    ``weight_transfer`` must be "none" (a teacher is frozen).
    """

    # Its own LLM (pooling runner), not _Engine's; close() and _check_lengths are shared.
    def __init__(self, settings: EngineSettings) -> None:
        _check_settings(settings)
        if settings.weight_transfer != "none":
            raise EngineError(
                f"TeacherHiddenEngine takes no weight pushes; weight_transfer must be 'none', "
                f"got {settings.weight_transfer!r}"
            )
        self.settings = settings
        self.llm = _start_llm(
            settings,
            runner="pooling",
            convert="embed",
            pooler_config={"task": "token_embed", "tok_pooling_type": "ALL"},
            # Pooling models cast their head's input to float32 by default
            # (vllm/config/model.py _get_head_dtype); "model" keeps the engine's dtype.
            hf_overrides={"head_dtype": "model"},
        )
        try:
            self.hidden_size, self.dtype = self._check_plain_head()
        except Exception:
            self.close()
            raise

    def _check_plain_head(self) -> tuple[int, torch.dtype]:
        """The pooler must hand on the final norm's output untouched: no Sentence-Transformers
        projector (a folder with modules.json Dense layers gets one) and the model's dtype."""
        config = self.llm.llm_engine.model_config
        # The same lookup vLLM's pooler makes (vllm/model_executor/models/adapters.py).
        if try_get_dense_modules(config.model, revision=config.revision) is not None:
            raise EngineError(
                f"{self.settings.model_path}: its modules.json names Sentence-Transformers Dense "
                f"layers, which vLLM's pooler would apply to the hidden states; expected none"
            )
        if config.head_dtype != config.dtype:
            raise EngineError(
                f"vLLM's pooler casts to {config.head_dtype}, not the engine's {config.dtype}"
            )
        return config.get_hidden_size(), config.dtype

    def hidden_states(
        self, prompt_ids: list[list[int]], response_ids: list[list[int]]
    ) -> list[torch.Tensor]:
        """h_T(x, y_<t) for each response token y_t: one tensor [R, H] per sequence, on CPU,
        in the engine's dtype, contiguous and owning its storage.

        Row t is the final-norm output at the position that predicts y_t, i.e. one before
        the position ``rollout.alignment.response_positions`` gives y_t's log-prob; so
        log softmax(lm_head(h[t]) / τ_T)[y_t] = log π_T(y_t | x, y_<t).
        """
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        self._check_lengths(seqs, 0)
        params = PoolingParams(use_activation=False)
        outputs = self.llm.encode(
            [TokensPrompt(prompt_token_ids=s) for s in seqs],
            params,
            pooling_task="token_embed",
            use_tqdm=False,
        )
        states = []
        for seq, p, r, out in zip(seqs, prompt_ids, response_ids, outputs, strict=True):
            h_TH = out.outputs.data
            if h_TH.shape != (len(seq), self.hidden_size):
                raise EngineError(
                    f"teacher returned hidden states {tuple(h_TH.shape)} for a {len(seq)}-token "
                    f"sequence (expected [{len(seq)}, {self.hidden_size}])"
                )
            span = response_positions(len(p), len(r))
            # The hidden state at position i predicts token i + 1. clone: the engine hands
            # views of its whole batch's buffer; the copy keeps only the response rows.
            states.append(h_TH[span.start - 1 : span.stop - 1].clone())
        return states


# Engine-side choice of weight transport; the transport itself is rollout/weight_transfer.py.
WEIGHT_TRANSFER_BACKENDS = ("none", *COLLECTIVE_BACKENDS)


def _weight_transfer_kwargs(weight_transfer: str) -> dict:
    """Extra ``LLM(...)`` arguments for ``EngineSettings.weight_transfer``; refuses what cannot work."""
    if weight_transfer not in WEIGHT_TRANSFER_BACKENDS:
        raise EngineError(
            f"weight_transfer must be one of {WEIGHT_TRANSFER_BACKENDS}, got {weight_transfer!r}"
        )
    if weight_transfer == "none":
        return {}
    backend = COLLECTIVE_BACKENDS[weight_transfer]
    if not backend.available():
        raise EngineError(
            f"weight_transfer={weight_transfer!r} needs {backend.needs} in this process "
            f"(cuda available: {torch.cuda.is_available()}); use rollout.sync_backend = "
            "'gloo' or 'object_store' on CPU"
        )
    from vllm.config import WeightTransferConfig

    return {"weight_transfer_config": WeightTransferConfig(backend=weight_transfer)}
