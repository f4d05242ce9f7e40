"""Which kernel a quantized linear runs on CUDA, per row count: the split-K streaming kernels
(kernels/wna16_splitk.py, fp8_gemv.py), the tiled wna16 kernel, or (FP8) ``torch._scaled_mm``.

In order: a layer's ``gemm_plan`` (rows rounded up to a power of two -> config; a tuner's), then the measured
winners for this device and weight shape (a JSON table written by benchmarks/gpu_quant_gemv_sweep.py: the one
shipped in kernels/configs/, or the file ``TOKENMILL_QUANT_GEMV_CONFIGS`` names, like vLLM's tuned MoE configs),
then defaults: for packed int4/int8 weights the tiled kernel's own choice (as before the split-K kernels; split-K
defaults for unmeasured shapes failed the H100 suite on tiny models), for FP8 the kinds that won on the H100
(benchmarks/results/gpu_quant_gemv_sweep_h100_2026-12-06.json). The ``rows`` kind and ``prefetch`` are sweep
candidates, not defaults: no GPU has timed them yet.

K-major 4-bit weights (``--quant-weight-layout kmajor``, kernels/w4_gemv.py's KMajorWeight) have their own table
format (``w4a16_g128_kmajor``) and kinds: the ``w4_gemv`` kind ``kmajor`` (FMA GEMV; entries with ``pdl`` /
``preload_steps`` launch it with PDL and request its first chunks before the wait), ``w4_kmajor_gemm``
(tensor cores; entries with ``w_lhs`` / ``gluon`` run its transposed product, entries without them today's
kernel) and ``dequant_mm`` (dense copy + cuBLAS); their defaults are ``default_kmajor_config``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import torch

from tokenmill.kernels._triton import next_power_of_2
from tokenmill.kernels.config_table import device_entries, device_keys, load_table
from tokenmill.kernels.fp8_stream import Fp8StreamConfig, fma_supported
from tokenmill.kernels.splitk import SplitKConfig
from tokenmill.kernels.w4_gemv import KMajorWeight, W4GemvConfig, w4_gemv
from tokenmill.kernels.w4_kmajor_dequant import KMajorDequantConfig, w4_kmajor_dequant_mm
from tokenmill.kernels.w4_kmajor_gemm import KMajorGemmConfig, w4_kmajor_gemm
from tokenmill.kernels.w4_kmajor_gluon import HAS_GLUON
from tokenmill.kernels.wna16_gemm import PackedWeight, WNA16Config, wna16_linear
from tokenmill.kernels.wna16_splitk import wna16_splitk_linear

FP8_GEMV_MAX_ROWS = 16  # above: torch._scaled_mm (tensor-core FP8)
# FP8 shapes the table does not list: False keeps kernels/fp8_gemv.py's split-K kinds (run 1's winners); True takes
# kernels/fp8_stream.py's (issue 22; flip once benchmarks/gpu_fp8_gemv_probe.py on the H100 confirms them).
FP8_STREAM_DEFAULT = False

# K-major 4-bit weights by row count (defaults; a measured table overrides them per shape): the K-major GEMV
# for 1-4 rows (H100 probe, benchmarks/results/gpu_w4_gemv_probe_h100_2026-12-07.json: 2.51x / 1.74x / 1.34x
# bf16 at 1 / 2 / 4 rows, behind the tensor cores from 8), the K-major tensor-core GEMM up to
# KMAJOR_GEMM_MAX_ROWS (decode batches), dequantize + cuBLAS above (prefill chunks: compute-bound).
KMAJOR_GEMV_MAX_ROWS = 4
KMAJOR_GEMM_MAX_ROWS = 256

KMajorChoice = W4GemvConfig | KMajorGemmConfig | KMajorDequantConfig
Fp8Choice = SplitKConfig | Fp8StreamConfig | None  # None: torch._scaled_mm
# None: the format's library path (FP8: _scaled_mm)
Choice = (SplitKConfig | WNA16Config | W4GemvConfig | KMajorGemmConfig | KMajorDequantConfig | Fp8StreamConfig
          | None)
Plan = dict[int, Choice]

SHIPPED_CONFIGS = Path(__file__).parent / "configs" / "quant_gemv.json"
CONFIGS_ENV = "TOKENMILL_QUANT_GEMV_CONFIGS"


KMAJOR_KERNELS = ("w4_kmajor_gemm", "dequant_mm")  # table kernels of K-major formats (with w4_gemv kind kmajor)
KMAJOR_SUFFIX = "_kmajor"  # a K-major weight's table format: w4a16_g128_kmajor


def config_from_json(entry: dict[str, Any]) -> Choice:
    """One table entry: {"kernel": "splitk" | "wna16_gemm" | "w4_gemv" | "fp8_stream" | "scaled_mm" |
    "w4_kmajor_gemm" | "dequant_mm", plus the config's fields}."""
    fields = {k: v for k, v in entry.items() if k != "kernel"}
    if entry["kernel"] == "w4_gemv":  # 4-bit; kind kmajor for K-major formats, the others for the GPTQ layout
        return W4GemvConfig(**fields)
    if entry["kernel"] == "w4_kmajor_gemm":
        if fields.get("gluon") and not HAS_GLUON:  # a table measured with Gluon, read by a Triton without it:
            fields.update(gluon=False, pipelined=False, weight_ring=False, pair_dequant=False,
                          register_a=False, finish_rows=0)  # the same tiles through Triton's w_lhs kernel
        return KMajorGemmConfig(**fields)
    if entry["kernel"] == "dequant_mm":
        return KMajorDequantConfig(**fields)
    if entry["kernel"] == "splitk":
        return SplitKConfig(**fields)
    if entry["kernel"] == "fp8_stream":  # FP8 weights only (kernels/fp8_stream.py)
        return Fp8StreamConfig(**fields)
    if entry["kernel"] == "wna16_gemm":
        return WNA16Config(**fields)
    if entry["kernel"] == "scaled_mm":
        return None
    raise ValueError(f"quantized GEMV config table: unknown kernel {entry['kernel']!r}")


def tuned_choice(device: torch.device, fmt: str, n: int, k: int, rows: int) -> tuple[bool, Choice]:
    """(found, choice) from the measured table: the entry for the smallest measured row count >= rows."""
    return _tuned(os.environ.get(CONFIGS_ENV) or str(SHIPPED_CONFIGS), device_keys(device), fmt, n, k, rows)


@functools.cache
def _tuned(path: str, keys: tuple[str, ...], fmt: str, n: int, k: int, rows: int) -> tuple[bool, Choice]:
    """tuned_choice's answer, worked out once per layer shape and row count (eager linears ask on every call)."""
    shapes = device_entries(load_table(path), keys).get(fmt, {}).get(f"{n}x{k}")
    if not shapes:
        return False, None
    bucket = min((int(r) for r in shapes if int(r) >= rows), default=None)
    if bucket is None:
        return False, None
    config = config_from_json(shapes[str(bucket)])
    if fmt.endswith(KMAJOR_SUFFIX) != _reads_k_major(config):
        raise ValueError(f"quantized GEMV config table {path}: format {fmt!r}, {n}x{k}, {bucket} rows names "
                         f"{shapes[str(bucket)]['kernel']!r}, a kernel for the other weight layout (K-major "
                         f"formats end in {KMAJOR_SUFFIX!r} and take only w4_gemv kind kmajor, "
                         f"{' and '.join(KMAJOR_KERNELS)})")
    return True, config


def _reads_k_major(config: Choice) -> bool:
    return isinstance(config, KMajorGemmConfig | KMajorDequantConfig) or (
        isinstance(config, W4GemvConfig) and config.kind == "kmajor")


def _split_for(tiles: int, steps: int) -> int:
    """Run 1's winners: 8 K splits for up to 64 output tiles, 4 above (never fewer than 2 K steps a split)."""
    split = 8 if tiles <= 64 else 4
    while split > 1 and steps // split < 2:
        split //= 2
    return split


def default_fp8_stream_config(rows: int, n: int, k: int) -> Fp8StreamConfig:
    """kernels/fp8_stream.py's defaults, from sm_90 SASS without a GPU (not yet timed): the fma kind up to 4
    rows (8 channels a program over all of K at 1-2 rows, 4 at 3-4), the mma kind above (and where K % 4 != 0),
    8 K splits for up to 64 output tiles, 4 above."""
    if rows <= 4 and fma_supported(k):
        return Fp8StreamConfig("fma", block_n=8 if rows <= 2 else 4, pairs=128)
    return Fp8StreamConfig("mma", block_n=64, block_k=128, split_k=_split_for(-(-n // 64), -(-k // 128)),
                           num_stages=3, asm=False)


def default_fp8_config(rows: int, n: int, k: int) -> Fp8Choice:
    """None above FP8_GEMV_MAX_ROWS: ``torch._scaled_mm``. With FP8_STREAM_DEFAULT, default_fp8_stream_config;
    else run 1's winners: 1 row, FMA streaming over [16, 512] or [32, 256] tiles, 2 splits; 2-16 rows, tensor-core
    streaming over 64-wide tiles."""
    if rows > FP8_GEMV_MAX_ROWS:
        return None
    if FP8_STREAM_DEFAULT:
        return default_fp8_stream_config(rows, n, k)
    if rows == 1:
        block_n, block_k = (16, 512) if n <= 4096 else (32, 256)
        return SplitKConfig(1, block_n, block_k, 2, 4, 2, "fma")
    return SplitKConfig(16, 64, 128, _split_for(-(-n // 64), -(-k // 128)), 4, 3, "dot")


def wna16_format(packed: PackedWeight | KMajorWeight) -> str:
    """The table's format key: ``w4a16_g128`` (GPTQ layout), ``w4a16_g128_kmajor`` (K-major)."""
    suffix = KMAJOR_SUFFIX if isinstance(packed, KMajorWeight) else ""
    return f"w{packed.bits}a16_g{packed.group_size}{suffix}"


def wna16_cuda_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """x [M, K] on CUDA through the planned, measured or default kernel for M rows."""
    rows = x.shape[0]
    n, k = packed.out_features, packed.in_features
    config = plan.get(next_power_of_2(max(rows, 1))) if plan else None
    if config is None:
        found, config = tuned_choice(x.device, wna16_format(packed), n, k, rows)
        if not found or config is None:
            # Shapes nobody measured keep the tiled kernel's own choice. Split-K defaults for them were tried
            # and failed the H100 suite on tiny models (a tensor-core tile's K below 16 does not compile).
            return wna16_linear(x, packed, bias)
    if isinstance(config, WNA16Config):
        return wna16_linear(x, packed, bias, config)
    if isinstance(config, W4GemvConfig):
        return w4_gemv(x, packed, config, bias)
    return wna16_splitk_linear(x, packed, bias, config)


def default_kmajor_config(rows: int, n: int, k: int, num_sms: int = 132) -> KMajorChoice:
    """The K-major layout's kernel for ``rows`` x ``n`` x ``k`` where nothing was measured: GEMV tiles that won the
    H100 probe at 1, 2 and 4 rows; the GEMM's probe candidates that compile for sm_90 without spills (the H100
    probe's winners per shape are table entries in configs/quant_gemv.json, which take precedence), past 64 rows with K split until the output
    tiles times the splits fill the SMs (at least 4 K steps a split; kernels/splitk.py lowers any split to what its
    workspace holds and K offers); dequantize + cuBLAS past KMAJOR_GEMM_MAX_ROWS."""
    if rows <= 1:
        return W4GemvConfig("kmajor", block_n=4, groups=16, num_warps=2, num_stages=2)
    if rows <= 2:
        return W4GemvConfig("kmajor", block_n=4, groups=32, num_warps=4, num_stages=2)
    if rows <= KMAJOR_GEMV_MAX_ROWS:
        return W4GemvConfig("kmajor", block_n=4, groups=16, num_warps=2, num_stages=2)
    if rows > KMAJOR_GEMM_MAX_ROWS:
        return KMajorDequantConfig()
    if rows <= 16:  # streaming: many K splits keep loads in flight (the probe's candidates)
        return KMajorGemmConfig(16, 64, 128, split_k=8)
    if rows <= 64:
        return KMajorGemmConfig(64, 64, 128, split_k=4, scale_codes=True)
    config = KMajorGemmConfig(128, 128, 64, num_warps=8, scale_codes=True)
    tiles = -(-rows // config.block_m) * -(-n // config.block_n)
    split = 1
    while tiles * split < num_sms and k // config.block_k // (2 * split) >= 4:
        split *= 2
    return dataclasses.replace(config, split_k=split)


def kmajor_choice(x: torch.Tensor, weight: KMajorWeight, plan: Plan) -> Choice:
    """The planned, measured or default kernel for x's rows times a K-major 4-bit weight."""
    rows = x.shape[0]
    config = plan.get(next_power_of_2(max(rows, 1))) if plan else None
    if config is None:
        found, config = tuned_choice(x.device, wna16_format(weight), weight.out_features, weight.in_features, rows)
        if not found or config is None:
            config = default_kmajor_config(rows, weight.out_features, weight.in_features)
    return config


def kmajor_gemv_choice(x: torch.Tensor, weight: KMajorWeight, plan: Plan) -> W4GemvConfig | None:
    """The K-major GEMV config x's rows go to, or None where they go to a GEMM (the GEMV's fusions need it)."""
    config = kmajor_choice(x, weight, plan)
    return config if isinstance(config, W4GemvConfig) and config.kind == "kmajor" else None


def kmajor_cuda_silu_and_mul(x: torch.Tensor, weight: KMajorWeight, bias: torch.Tensor | None,
                             plan: Plan) -> torch.Tensor | None:
    """silu(gate) * up of a fused gate|up K-major weight in one launch where x's rows go to the K-major GEMV (its
    ``act_mul`` epilogue); None where they go to a GEMM (the caller runs the pair)."""
    config = kmajor_gemv_choice(x, weight, plan)
    if config is None or config.block_n < 2:
        return None
    return w4_gemv(x, weight, config, bias, act_mul=True)


def kmajor_cuda_linear(x: torch.Tensor, weight: KMajorWeight, bias: torch.Tensor | None, plan: Plan) -> torch.Tensor:
    """x [M, K] on CUDA times a K-major 4-bit weight through the planned, measured or default kernel for M rows."""
    config = kmajor_choice(x, weight, plan)
    if isinstance(config, W4GemvConfig):
        return w4_gemv(x, weight, config, bias)
    if isinstance(config, KMajorGemmConfig):
        return w4_kmajor_gemm(x, weight, config, bias)
    if isinstance(config, KMajorDequantConfig):
        return w4_kmajor_dequant_mm(x, weight, config, bias)
    raise ValueError(f"{type(config).__name__} is a kernel config for GPTQ-layout weights, not K-major ones")


def fp8_gemv_config(x: torch.Tensor, n: int, plan: Plan) -> Fp8Choice:
    """The FP8 GEMV config for x's rows (kernels/fp8_gemv.py's SplitKConfig or kernels/fp8_stream.py's
    Fp8StreamConfig), or None where ``torch._scaled_mm`` serves them."""
    return fp8_rows_config(x.shape[0], n, x.shape[1], x.device, plan)


def fp8_rows_config(rows: int, n: int, k: int, device: torch.device, plan: Plan) -> Fp8Choice:
    """``fp8_gemv_config`` by row count, before the input exists (a producer asks whether to quantize for it)."""
    key = next_power_of_2(max(rows, 1))
    if plan and key in plan:
        return plan[key]
    found, config = tuned_choice(device, "fp8", n, k, rows)
    if found:
        stream_ok = isinstance(config, Fp8StreamConfig) and rows <= config.max_rows and (
            config.kind != "fma" or fma_supported(k))
        if isinstance(config, SplitKConfig) or stream_ok:
            return config
        return default_fp8_config(rows, n, k) if isinstance(config, Fp8StreamConfig) else None
    return default_fp8_config(rows, n, k)

