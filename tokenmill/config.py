"""Validated configuration objects, one per concern.

Each dataclass checks itself in ``__post_init__`` and raises ``ValueError`` with a sentence a user can act on.
``EngineConfig`` bundles the others; the CLI and ``LLM(**kwargs)`` build it through ``EngineConfig.from_kwargs``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.intmath import cdiv

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(name: str | torch.dtype, device: str) -> torch.dtype:
    """Map a user dtype name to a torch dtype; 'auto' is bf16 on CUDA and fp32 on CPU."""
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {name!r}")
    return _DTYPES[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]'; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but torch sees no CUDA GPU")
    return name


# --quant-weight-layout values: auto (quantization/weight_layout.py's AUTO_WEIGHT_LAYOUT), gptq (packed along K
# as loaded), kmajor (only the K-major repack of 4-bit weights, kernels/w4_gemv.py).
QUANT_WEIGHT_LAYOUTS = ("auto", "gptq", "kmajor")


@dataclass
class ModelConfig:
    """Which weights to load and how. ``model`` is a HF directory or a .gguf file (None: embedded SmolLM2)."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None  # None: the model's own limit (max_position_embeddings)
    seed: int = 0
    served_model_name: str | None = None
    chat_template: str | None = None  # a path or a literal Jinja template overriding the model's
    # Build random weights of a known shape instead of loading (benchmarks on real shapes without files).
    random_weights: str | None = None
    # vLLM's --quantization: checked against the checkpoint's format, or quantizes a dense model at load.
    quantization: str | None = None
    # Device layout of 4-bit weight-only linears (quantization/weight_layout.py): auto | gptq | kmajor.
    quant_weight_layout: str = "auto"
    # vLLM's compilation-config pass_config keys: an RMSNorm (a SiLU-and-mul) hands the next W8A8 linear with
    # dynamic per-token scales its output already in FP8, made in the same kernel (model/layers.py).
    fuse_norm_quant: bool = True
    fuse_act_quant: bool = True
    # tokenmill's pass_config key (vLLM has none for it): a gate|up projection whose kernel can apply SiLU-and-mul in
    # its epilogue at this row count (the 4-bit K-major GEMV, the FP8 fma GEMV) does, saving the activation's launch.
    fuse_gemm_act: bool = True
    # tokenmill's too, off: where the GEMVs can (the 4-bit K-major GEMV at 1-4 rows), o_proj / down_proj add the
    # residual stream in their epilogue and qkv / gate_up apply the RMSNorm in their prologue (no norm kernel). Off
    # because it was slower on the H100 (batch-1 step 2.667 vs 2.434 ms) when every GEMV program re-read x for 1 / rms;
    # now o_proj / down_proj make the next norm's input in their epilogue (the stream times the norm weight and its
    # sums of squares) and qkv / gate_up only scale by 1 / rms, in the W4 K-major and the FP8 fma GEMVs (not yet
    # timed on a GPU). H100, s25 / s26: batch-1 step W4 2.449 -> 2.387 ms, FP8 3.398 -> 3.312; stays off until the W4
    # model test (tests/quantization/test_kmajor_layout.py, producers on CUDA) has passed on a GPU.
    fuse_gemm_norm: bool = False
    # The untied LM head quantized at load too (fp8 per vocabulary row; rtn4 / int8 codes); vLLM keeps it dense.
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, self.device)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1; got {self.max_model_len}")
        if self.quant_weight_layout not in QUANT_WEIGHT_LAYOUTS:
            raise ValueError(f"quant_weight_layout must be one of {', '.join(QUANT_WEIGHT_LAYOUTS)}; "
                             f"got {self.quant_weight_layout!r}")
        if self.quant_weight_layout == "kmajor" and not self.device.startswith("cuda"):
            raise ValueError(f"quant_weight_layout 'kmajor' serves 4-bit weights on CUDA GPUs only; device is "
                             f"{self.device!r} (use auto or gptq)")


KV_SCALE_GRANULARITIES = (None, "tensor", "head")

# --kv-cache-dtype values (vLLM's): auto keeps the model's dtype; fp8 is e4m3 (more mantissa, range to 448),
# fp8_e5m2 trades mantissa for range. FP8 caches store K/V divided by a per-layer scale (1.0 unless calculated).
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True)
class KVCacheSpec:
    """What one layer's paged KV cache holds; every producer and consumer of the cache reads it from here.

    ``scale_granularity`` says whether stored K/V carry dequantization scales (FP8 KV): None (stored values
    are exact), "tensor" (one k and one v scale per layer) or "head" (one per KV head).
    """

    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    scale_granularity: str | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.num_kv_heads < 1 or self.head_dim < 1:
            raise ValueError(f"KV cache block_size, num_kv_heads and head_dim must be >= 1; got {self}")
        if self.scale_granularity not in KV_SCALE_GRANULARITIES:
            raise ValueError(f"KV scale granularity must be one of {KV_SCALE_GRANULARITIES}; "
                             f"got {self.scale_granularity!r}")

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    @property
    def scale_shape(self) -> tuple[int, ...] | None:
        """Shape of each layer's k (and v) scale tensor; None when the cache stores exact values."""
        if self.scale_granularity is None:
            return None
        return () if self.scale_granularity == "tensor" else (self.num_kv_heads,)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K and V for one block of one layer."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * element


@dataclass
class CacheConfig:
    """Paged KV cache: block size and how many blocks (a CPU memory budget, a GPU fraction, or a count)."""

    block_size: int = 16
    cache_dtype: str = "auto"  # vLLM's name (--kv-cache-dtype): auto (the model's dtype) | fp8 | fp8_e4m3 | fp8_e5m2
    # FP8 caches: set each layer's k/v scale from the first real step's keys/values (vLLM's
    # --calculate-kv-scales) instead of 1.0.
    calculate_kv_scales: bool = False
    kv_cache_memory_gib: float | None = None  # CPU budget; default picks a modest size
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None  # explicit block count, wins over the budgets
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two between 1 and 128; got {self.block_size}")
        if self.kv_cache_memory_gib is not None and self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB; got {self.kv_cache_memory_gib}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 2:
            raise ValueError(f"num_gpu_blocks_override must be >= 2; got {self.num_gpu_blocks_override}")
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv cache dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.cache_dtype!r}")
        if self.calculate_kv_scales and KV_CACHE_DTYPES[self.cache_dtype] is None:
            raise ValueError("calculate_kv_scales needs an FP8 KV cache: add --kv-cache-dtype fp8")

    def kv_cache_spec(self, num_kv_heads: int, head_dim: int, model_dtype: torch.dtype) -> KVCacheSpec:
        """The per-layer cache spec once the model's KV shape is known; FP8 caches carry one k and one v scale
        per layer."""
        fp8 = KV_CACHE_DTYPES[self.cache_dtype]
        if fp8 is None:
            return KVCacheSpec(self.block_size, num_kv_heads, head_dim, model_dtype)
        return KVCacheSpec(self.block_size, num_kv_heads, head_dim, fp8, "tensor")


KV_RESERVATIONS = ("none", "request", "max-model-len")


@dataclass
class SchedulerConfig:
    """Continuous batching limits: sequences per step and tokens per step (chunked prefill splits prompts)."""

    max_num_seqs: int = 256
    # Tokens per step; None: 8192 on CUDA (vLLM's serving default; measured on the H100: Llama-3-8B 128 × 512
    # prefill at 74.8% of the matmul rate vs 68.8% at 2048), 2048 on CPU (shorter mixed steps there).
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    max_waiting_requests: int | None = None  # backpressure for the server; None: unbounded
    # Most prompt tokens one request may compute in a step (0: no cap, only the step budget). With it a long prompt
    # is chunked over several steps and leaves budget to other prompts; together with max_num_batched_tokens it
    # bounds how much prefill a step adds to the running decodes' inter-token latency (lower: steadier ITL, later
    # first tokens for long prompts).
    long_prefill_token_threshold: int = 0
    # Reserve each request's whole KV up front, as a contiguous allocator must: "none" (paged: blocks are taken as
    # tokens arrive), "request" (prompt + max_tokens) or "max-model-len". For measuring what paging buys
    # (`bench kv-memory`); it only ever lowers the batch.
    kv_reservation: str = "none"

    def __post_init__(self) -> None:
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"kv_reservation must be one of {', '.join(KV_RESERVATIONS)}; got {self.kv_reservation!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1; got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1; got {self.max_num_batched_tokens}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0; got {self.max_waiting_requests}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0 (0: no cap); got "
                             f"{self.long_prefill_token_threshold}")
        if self.long_prefill_token_threshold and not self.enable_chunked_prefill:
            raise ValueError("long_prefill_token_threshold chunks prompts: it needs enable_chunked_prefill")


CUDAGRAPH_MODES = ("NONE", "FULL_DECODE_ONLY", "FULL_AND_PIECEWISE")
# The keys of vLLM's --compilation-config this engine reads, and of its pass_config (model build options).
COMPILATION_CONFIG_KEYS = ("cudagraph_mode", "max_cudagraph_capture_size", "pass_config")
PASS_CONFIG_KEYS = ("fuse_norm_quant", "fuse_act_quant", "fuse_gemm_act", "fuse_gemm_norm")
# Largest decode batch captured as a CUDA graph when max_cudagraph_capture_size is not given: vLLM's cap (more
# graphs lengthen start-up; a larger decode batch runs eagerly or through piecewise graphs).
DEFAULT_MAX_GRAPH_BATCH = 512


def json_object(value: str | dict[str, Any], name: str) -> dict[str, Any]:
    """A JSON-object flag (``--speculative-config``, ``--compilation-config``) given as text or as a dict."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--{name.replace('_', '-')} must be a JSON object; {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object; got {type(value).__name__}")
    return value


def parse_compilation_config(value: str | dict[str, Any] | None) -> dict[str, Any]:
    """vLLM's ``--compilation-config`` (JSON or a dict) as runner keyword arguments; unknown keys are errors."""
    if value is None:
        return {}
    value = json_object(value, "compilation_config")
    unknown = sorted(set(value) - set(COMPILATION_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"compilation_config keys {unknown} are not supported; known: {list(COMPILATION_CONFIG_KEYS)}")
    value = dict(value)
    passes = json_object(value.pop("pass_config", {}), "pass_config")
    unknown = sorted(set(passes) - set(PASS_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"compilation_config pass_config keys {unknown} are not supported; known: "
                         f"{list(PASS_CONFIG_KEYS)}")
    for key, flag in passes.items():
        if not isinstance(flag, bool):
            raise ValueError(f"compilation_config pass_config {key} must be true or false; got {flag!r}")
    return {**value, **passes}


@dataclass
class RunnerConfig:
    """How the model runs: eager or CUDA graphs, attention backend choice."""

    enforce_eager: bool = False
    attention_backend: str = "auto"  # auto | torch | triton
    # Largest decode batch captured as a CUDA graph (vLLM's max_cudagraph_capture_size); None: min(max_num_seqs,
    # DEFAULT_MAX_GRAPH_BATCH), set by EngineConfig.
    max_graph_batch_size: int | None = None
    tensor_parallel_size: int = 1  # ranks sharing each layer (one process per rank; gloo on CPU, NCCL on GPU)
    # Tensor parallelism on GPUs: all-reduces of up to 8 MiB through a one-shot Triton kernel over CUDA IPC
    # buffers instead of NCCL (larger ones stay on NCCL). Off by default until measured on several GPUs.
    custom_all_reduce: bool = False
    # Schedule and launch step N+1 while the GPU still runs step N (the host waits for step N's ids after
    # queueing N+1). None: on for a single CUDA device, off elsewhere (a CPU forward pass is synchronous).
    async_scheduling: bool | None = None
    # Time cuBLAS against the tiled Triton GEMM per weight shape at decode row counts at start-up (bf16/fp16
    # on CUDA); each (shape, rows) keeps whichever is faster.
    tune_gemm: bool = True
    # vLLM's compilation-config key. FULL_AND_PIECEWISE (the default, as in vLLM): steps with prompts (up to
    # runner/piecewise_graphs.py's token cap) also replay graphs of everything between attention calls (H100,
    # chatbot load: p99 ITL 41 -> 20 ms, rate-inf throughput 1.13x); FULL_DECODE_ONLY: graphs for decode and
    # verification steps only, other steps eager; NONE: eager, as enforce_eager.
    cudagraph_mode: str = "FULL_AND_PIECEWISE"

    def schedules_async(self, on_cuda: bool) -> bool:
        """Whether the engine overlaps steps (and tensor-parallel ranks share rank 0's sampled ids)."""
        return on_cuda if self.async_scheduling is None else self.async_scheduling

    def __post_init__(self) -> None:
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton; got {self.attention_backend!r}")
        if self.max_graph_batch_size is not None and self.max_graph_batch_size < 1:
            raise ValueError(f"max_cudagraph_capture_size must be >= 1; got {self.max_graph_batch_size}")
        if not 1 <= self.tensor_parallel_size <= 64:
            raise ValueError(f"tensor_parallel_size must be between 1 and 64; got {self.tensor_parallel_size}")
        mode = str(self.cudagraph_mode).upper()
        if mode not in CUDAGRAPH_MODES:
            raise ValueError(f"cudagraph_mode must be one of {', '.join(CUDAGRAPH_MODES)}; got {self.cudagraph_mode!r}")
        self.cudagraph_mode = mode
        if mode == "NONE":
            self.enforce_eager = True

    @property
    def piecewise_graphs(self) -> bool:
        return self.cudagraph_mode == "FULL_AND_PIECEWISE" and not self.enforce_eager


SPECULATIVE_METHODS = ("ngram", "draft_model", "eagle")


@dataclass
class SpeculativeConfig:
    """Speculative decoding (vLLM's ``--speculative-config`` keys): who proposes draft tokens and how many.

    ``ngram``: prompt lookup (the last ``prompt_lookup_min..max`` tokens matched earlier in the prompt + output).
    ``draft_model``: a second, small model at ``model`` sharing the target's tokenizer. ``eagle``: an EAGLE-1 draft
    head at ``model`` (vLLM's ``EagleLlamaForCausalLM`` layout) reading the target's hidden states. ``disable_by_batch_size``
    turns speculation off while more sequences than that run (vLLM's key); the adaptive policy (spec_decode/)
    also lowers k per step as the batch grows or acceptance drops, unless ``adaptive`` is False.
    ``draft_vocab_size``: the draft proposes from its N most frequent token ids (EAGLE-3's key; the draft directory's
    ``draft_vocab.json``, spec_decode/draft_vocab.py); None: the draft directory's own setting.
    """

    method: str | None = None
    num_speculative_tokens: int = 0
    model: str | None = None
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    disable_by_batch_size: int | None = None
    adaptive: bool = True
    draft_dtype: str | None = None  # None: the target's dtype
    draft_vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.method is None:  # vLLM infers it: "ngram" (or "[ngram]") as the model name, else a draft model
            if self.model in ("ngram", "[ngram]"):
                self.method, self.model = "ngram", None
            elif self.model is not None:
                self.method = "draft_model"
            else:
                raise ValueError('speculative_config needs "method" ("ngram", "draft_model" or "eagle") or a draft '
                                 '"model"')
        if self.method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(SPECULATIVE_METHODS)}; "
                             f"got {self.method!r}")
        if not 1 <= self.num_speculative_tokens <= 7:  # 1 + k query tokens: the decode kernel's limit is 8
            raise ValueError("num_speculative_tokens must be between 1 and 7 (a verification row has 1 + k <= 8 "
                             f"query tokens); got {self.num_speculative_tokens}")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError(f'method "ngram" takes no draft model; got model {self.model!r}')
            if self.prompt_lookup_max is None:
                self.prompt_lookup_max = self.prompt_lookup_min or 4
            if self.prompt_lookup_min is None:
                self.prompt_lookup_min = min(2, self.prompt_lookup_max)
            if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
                raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max; got "
                                 f"min {self.prompt_lookup_min}, max {self.prompt_lookup_max}")
        elif self.model is None and self.method == "eagle":
            raise ValueError('method "eagle" needs "model": the directory of an EAGLE head trained for the target '
                             "(config.json + model.safetensors, as tokenmill's benchmarks/eagle_cpu.py saves one)")
        elif self.model is None:
            raise ValueError('method "draft_model" needs "model": a directory (or .gguf) of a small model '
                             "with the target's tokenizer")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be >= 1; got {self.disable_by_batch_size}")
        if self.draft_vocab_size is not None and (self.method == "ngram" or self.draft_vocab_size < 1):
            raise ValueError('draft_vocab_size applies to methods "draft_model" and "eagle" and must be >= 1; got '
                             f"{self.draft_vocab_size} with method {self.method!r}")

    @classmethod
    def parse(cls, value: SpeculativeConfig | dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From a JSON string (the CLI flag), a dict (``LLM(speculative_config={...})``) or the object itself."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        value = json_object(value, "speculative_config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config key(s) {unknown}; known: {sorted(known)}")
        return cls(**value)


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        if self.scheduler.max_num_batched_tokens is None:
            on_cuda = self.model.device.startswith("cuda")
            self.scheduler.max_num_batched_tokens = 8192 if on_cuda else 2048
        if self.runner.max_graph_batch_size is None:
            self.runner.max_graph_batch_size = min(self.scheduler.max_num_seqs, DEFAULT_MAX_GRAPH_BATCH)
        if self.cache.calculate_kv_scales and self.runner.tensor_parallel_size > 1:
            raise ValueError("calculate_kv_scales works on one rank only for now; drop it (scales stay 1.0) or "
                             "use tensor_parallel_size 1")

    def check_against_model(self, max_model_len: int) -> None:
        """Cross-field checks that need the model's context length (called once it is known)."""
        sched = self.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= max_model_len "
                f"({max_model_len}) when chunked prefill is off"
            )

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat vLLM-style keyword arguments (``LLM(model=..., block_size=8, ...)``)."""
        speculative = SpeculativeConfig.parse(kwargs.pop("speculative_config", None))
        kwargs.update(parse_compilation_config(kwargs.pop("compilation_config", None)))
        groups: dict[str, dict[str, Any]] = {"model": {}, "cache": {}, "scheduler": {}, "runner": {}}
        owners = {
            "model": ModelConfig,
            "cache": CacheConfig,
            "scheduler": SchedulerConfig,
            "runner": RunnerConfig,
        }
        aliases = {"kv_cache_memory": "kv_cache_memory_gib", "num_kv_blocks": "num_gpu_blocks_override",
                   "kv_cache_dtype": "cache_dtype", "max_cudagraph_capture_size": "max_graph_batch_size"}
        for key, value in kwargs.items():
            key = aliases.get(key, key)
            for group, klass in owners.items():
                if key in {f.name for f in dataclasses.fields(klass)}:
                    groups[group][key] = value
                    break
            else:
                raise TypeError(f"unknown engine argument {key!r}")
        return cls(
            model=ModelConfig(**groups["model"]),
            cache=CacheConfig(**groups["cache"]),
            scheduler=SchedulerConfig(**groups["scheduler"]),
            runner=RunnerConfig(**groups["runner"]),
            speculative=speculative,
        )
