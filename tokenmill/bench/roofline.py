"""Physical time floor of an engine step: FLOPs over the matmul rate vs bytes over the copy bandwidth.

Pure arithmetic on a ModelSpec and a step's composition; ``bench throughput`` and the GPU benchmark use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.model.spec import ModelSpec

# H100 80GB HBM3 ceilings measured on the device box (shared/GPU_NOTES.md).
H100_COPY_GBPS = 3010.0  # device-to-device copy, read + write counted
H100_MATMUL_TFLOPS = 800.0  # bf16 8192^3 matmul


@dataclass(frozen=True)
class Ceilings:
    bandwidth_gbps: float = H100_COPY_GBPS  # GB/s, 1 GB = 1e9 bytes
    matmul_tflops: float = H100_MATMUL_TFLOPS

    def __post_init__(self) -> None:
        if self.bandwidth_gbps <= 0:
            raise ValueError(f"bandwidth_gbps must be > 0; got {self.bandwidth_gbps}")
        if self.matmul_tflops <= 0:
            raise ValueError(f"matmul_tflops must be > 0; got {self.matmul_tflops}")


@dataclass(frozen=True)
class StepShape:
    """What one engine step computed: per scheduled sequence, tokens already cached and tokens run now."""

    cached: tuple[int, ...]  # num_computed_tokens before the step
    new: tuple[int, ...]  # tokens computed this step (1 when decoding)
    num_sampled: int  # sequences whose logits were computed (lm_head rows)

    @property
    def is_decode(self) -> bool:
        return bool(self.new) and all(n == 1 for n in self.new)

    @property
    def num_tokens(self) -> int:
        return sum(self.new)


def layer_params(spec: ModelSpec) -> int:
    """Parameters of the decoder layers and final norm (no embedding table, no lm_head)."""
    h, d = spec.hidden_size, spec.head_dim
    q = h * spec.num_heads * d
    kv = 2 * h * spec.num_kv_heads * d
    o = spec.num_heads * d * h
    mlp = 3 * h * spec.intermediate_size
    norms = 2 * h + (2 * d if spec.qk_norm else 0)
    bias = (spec.num_heads + 2 * spec.num_kv_heads) * d if spec.qkv_bias else 0
    bias += h if spec.o_bias else 0
    bias += 2 * spec.intermediate_size + h if spec.mlp_bias else 0
    return spec.num_layers * (q + kv + o + mlp + norms + bias) + h


def total_params(spec: ModelSpec) -> int:
    """All parameters, counting a tied embedding / lm_head once (the size of the checkpoint)."""
    embed = spec.vocab_size * spec.hidden_size
    return layer_params(spec) + embed * (1 if spec.tie_word_embeddings else 2)


def weight_bytes(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """Bytes of all weights; Llama-3-8B in bf16 = 16.06e9."""
    return total_params(spec) * dtype_bytes


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """K and V of one token over all layers; Llama-3-8B in bf16 = 131072."""
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype_bytes


def attention_pairs(cached: int, new: int) -> int:
    """(query, key) pairs of causal attention for ``new`` queries after ``cached`` context tokens."""
    return new * cached + new * (new + 1) // 2


def step_flops(spec: ModelSpec, step: StepShape) -> float:
    """Matmul FLOPs: 2 × layer params per token, 2 × vocab × hidden per sampled row, and attention
    QK^T + PV = 4 × layers × heads × head_dim per (query, key) pair."""
    dense = 2.0 * layer_params(spec) * step.num_tokens
    head = 2.0 * spec.vocab_size * spec.hidden_size * step.num_sampled
    pairs = sum(attention_pairs(c, n) for c, n in zip(step.cached, step.new, strict=True))
    attn = 4.0 * spec.num_layers * spec.num_heads * spec.head_dim * pairs
    return dense + head + attn


@dataclass(frozen=True)
class StoredBytes:
    """What the weights and the KV cache take in memory when not ``dtype_bytes`` a value: ``weights`` the bytes of
    all weights as served (4-bit codes and scales, FP8), ``kv_element`` the KV cache's bytes a value (FP8: 1)."""

    weights: int | None = None
    kv_element: int | None = None


def _weights_and_kv(spec: ModelSpec, dtype_bytes: int, stored: StoredBytes | None) -> tuple[int, int]:
    """(weight bytes, KV bytes a token) for the roofline."""
    stored = stored or StoredBytes()
    weights = stored.weights if stored.weights is not None else weight_bytes(spec, dtype_bytes)
    kv = kv_bytes_per_token(spec, stored.kv_element if stored.kv_element is not None else dtype_bytes)
    return weights, kv


def step_bytes(spec: ModelSpec, step: StepShape, dtype_bytes: int = 2, stored: StoredBytes | None = None) -> float:
    """Bytes moved at least once: all weights, the cached KV read, the new KV written."""
    weights, per_token = _weights_and_kv(spec, dtype_bytes, stored)
    kv_read = per_token * sum(step.cached)
    kv_written = per_token * step.num_tokens
    return float(weights + kv_read + kv_written)


def bandwidth_time(spec: ModelSpec, step: StepShape, ceilings: Ceilings, dtype_bytes: int = 2,
                   stored: StoredBytes | None = None) -> float:
    """Seconds to move ``step_bytes`` at the copy bandwidth (the decode roofline)."""
    return step_bytes(spec, step, dtype_bytes, stored) / (ceilings.bandwidth_gbps * 1e9)


def compute_time(spec: ModelSpec, step: StepShape, ceilings: Ceilings) -> float:
    return step_flops(spec, step) / (ceilings.matmul_tflops * 1e12)


def serial_time(spec: ModelSpec, step: StepShape, ceilings: Ceilings, dtype_bytes: int = 2) -> float:
    """A step whose kernels run one after another: the matmuls at the slower of their FLOPs and the weights' bytes,
    then attention at its KV bytes (read and written), which no matmul overlaps. Above ``floor_time``, whose max()
    lets a step's KV traffic hide under its matmuls; the two agree for weight-bound steps with little KV."""
    per_token = kv_bytes_per_token(spec, dtype_bytes)
    kv = per_token * (sum(step.cached) + step.num_tokens) / (ceilings.bandwidth_gbps * 1e9)
    weights = weight_bytes(spec, dtype_bytes) / (ceilings.bandwidth_gbps * 1e9)
    return max(compute_time(spec, step, ceilings), weights) + kv


def floor_time(spec: ModelSpec, step: StepShape, ceilings: Ceilings, dtype_bytes: int = 2,
               stored: StoredBytes | None = None) -> float:
    """Physical floor of one step: the slower of compute and memory traffic."""
    return max(compute_time(spec, step, ceilings), bandwidth_time(spec, step, ceilings, dtype_bytes, stored))


@dataclass(frozen=True)
class RooflineSummary:
    num_steps: int
    measured_s: float  # sum of measured step times
    floor_s: float  # sum of per-step floors over all steps
    num_decode_steps: int
    decode_measured_s: float
    decode_roofline_s: float  # bytes / bandwidth over decode-only steps
    prefill_measured_s: float = 0.0  # steps with any prompt tokens (prefill or mixed)
    prefill_compute_s: float = 0.0  # their FLOPs / matmul rate

    @property
    def prefill_matmul_pct(self) -> float:
        """Achieved share of the matmul rate over prefill/mixed steps (the issue's prefill target)."""
        return 100.0 * self.prefill_compute_s / self.prefill_measured_s if self.prefill_measured_s > 0 else 0.0

    @property
    def floor_pct(self) -> float:
        return 100.0 * self.floor_s / self.measured_s if self.measured_s > 0 else 0.0

    @property
    def decode_roofline_pct(self) -> float:
        return 100.0 * self.decode_roofline_s / self.decode_measured_s if self.decode_measured_s > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "num_steps": self.num_steps,
            "measured_s": self.measured_s,
            "floor_s": self.floor_s,
            "floor_pct": self.floor_pct,
            "num_decode_steps": self.num_decode_steps,
            "decode_measured_s": self.decode_measured_s,
            "decode_roofline_s": self.decode_roofline_s,
            "decode_roofline_pct": self.decode_roofline_pct,
            "prefill_measured_s": self.prefill_measured_s,
            "prefill_compute_s": self.prefill_compute_s,
            "prefill_matmul_pct": self.prefill_matmul_pct,
        }


def summarize(
    spec: ModelSpec,
    steps: Sequence[StepShape],
    times_s: Sequence[float],
    ceilings: Ceilings,
    dtype_bytes: int = 2,
    stored: StoredBytes | None = None,
) -> RooflineSummary:
    """Floor over all steps and bandwidth roofline over decode-only steps, against measured step times; bytes
    from ``dtype_bytes`` a value unless ``stored`` gives what quantized weights or an FP8 cache really take."""
    if len(steps) != len(times_s):
        raise ValueError(f"steps ({len(steps)}) and times_s ({len(times_s)}) must have the same length")
    floor = sum(floor_time(spec, s, ceilings, dtype_bytes, stored) for s in steps)
    decode = [(s, t) for s, t in zip(steps, times_s, strict=True) if s.is_decode]
    prefill = [(s, t) for s, t in zip(steps, times_s, strict=True) if not s.is_decode]
    return RooflineSummary(
        num_steps=len(steps),
        measured_s=float(sum(times_s)),
        floor_s=floor,
        num_decode_steps=len(decode),
        decode_measured_s=float(sum(t for _, t in decode)),
        decode_roofline_s=sum(bandwidth_time(spec, s, ceilings, dtype_bytes, stored) for s, _ in decode),
        prefill_measured_s=float(sum(t for _, t in prefill)),
        prefill_compute_s=sum(compute_time(spec, s, ceilings) for s, _ in prefill),
    )


def wave_schedule(num_requests: int, input_len: int, output_len: int, max_num_seqs: int,
                  max_num_batched_tokens: int) -> list[StepShape]:
    """The steps of an ideal run of ``num_requests`` equal requests all present at once, ``max_num_seqs`` at a time:
    each wave prefills its prompts (whole prompts per step, up to the token budget; the first output token comes
    from there), then decodes ``output_len - 1`` steps at the wave's batch. No mixing, no chunking: the FLOPs and
    bytes any schedule must spend at that batch, so the floor of a real run at that ``max_num_seqs``."""
    if min(num_requests, input_len, output_len, max_num_seqs, max_num_batched_tokens) < 1:
        raise ValueError("wave_schedule needs positive sizes")
    steps: list[StepShape] = []
    prompts_per_step = max(1, max_num_batched_tokens // input_len)
    for first in range(0, num_requests, max_num_seqs):
        wave = min(max_num_seqs, num_requests - first)
        for start in range(0, wave, prompts_per_step):
            n = min(prompts_per_step, wave - start)
            steps.append(StepShape(cached=(0,) * n, new=(input_len,) * n, num_sampled=n))
        for i in range(output_len - 1):
            steps.append(StepShape(cached=(input_len + i,) * wave, new=(1,) * wave, num_sampled=wave))
    return steps


@dataclass(frozen=True)
class WaveFloor:
    """``wave_floor``'s answer: seconds of the prefill and decode steps at their floors, output tokens per second."""

    prefill_s: float
    decode_s: float
    num_decode_steps: int
    decode_step_s: float  # mean floor of a decode step
    decode_compute_bound_share: float  # of decode steps whose FLOPs / matmul rate >= bytes / bandwidth
    output_tok_s: float
    serial_decode_step_s: float  # mean ``serial_time`` of a decode step
    serial_output_tok_s: float  # every step at its ``serial_time``

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def wave_floor(spec: ModelSpec, num_requests: int, input_len: int, output_len: int, max_num_seqs: int,
               max_num_batched_tokens: int, ceilings: Ceilings, dtype_bytes: int = 2) -> WaveFloor:
    """The physical floor of ``wave_schedule``: each step at the slower of its FLOPs and its bytes."""
    steps = wave_schedule(num_requests, input_len, output_len, max_num_seqs, max_num_batched_tokens)
    prefill = sum(floor_time(spec, s, ceilings, dtype_bytes) for s in steps if not s.is_decode)
    decode_steps = [s for s in steps if s.is_decode]
    decode = sum(floor_time(spec, s, ceilings, dtype_bytes) for s in decode_steps)
    compute_bound = sum(compute_time(spec, s, ceilings) >= bandwidth_time(spec, s, ceilings, dtype_bytes)
                        for s in decode_steps)
    serial_decode = sum(serial_time(spec, s, ceilings, dtype_bytes) for s in decode_steps)
    serial = serial_decode + sum(serial_time(spec, s, ceilings, dtype_bytes) for s in steps if not s.is_decode)
    n = len(decode_steps)
    tokens = num_requests * output_len
    return WaveFloor(prefill, decode, n, decode / n if n else 0.0, compute_bound / n if n else 0.0,
                     tokens / (prefill + decode), serial_decode / n if n else 0.0, tokens / serial)
