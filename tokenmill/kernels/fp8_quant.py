"""Dynamic FP8 (e4m3) quantization of activations: one scale per row (token), computed and applied in one kernel.

W8A8 linears quantize their input before every matmul; in torch that is five launches (abs, amax, divide, clamp,
cast) and two extra passes over the activations. Here one program per row reads the row twice (max, then
quantize) and writes the FP8 row and its fp32 scale. ``quantize_fp8`` is the torch reference (and the CPU path).
A producer that already holds the row (RMSNorm, SiLU-and-mul: kernels/rms_norm.py, activation.py) can emit the same
pair itself as ``Fp8Tokens``, which saves this pass (model/layers.py asks the consuming linear whether it wants one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, next_power_of_2, require_triton, tl, triton

FP8_E4M3 = torch.float8_e4m3fn
FP8_E4M3_MAX = float(torch.finfo(FP8_E4M3).max)  # 448
MIN_SCALE = 1e-12  # an all-zero row still gets a finite, nonzero scale


@dataclass(frozen=True, slots=True)
class Fp8Tokens:
    """Activations already quantized per token, as a W8A8 linear with dynamic scales consumes them: ``values`` e4m3
    [T, K], ``scales`` fp32 [T, 1] (values * scales ~= the activations), ``dtype`` the activations' own dtype (the
    linear's output takes it). Only a linear whose method said yes (``LinearMethod.accepts_fp8_tokens``) gets one."""

    values: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype


def quantize_fp8(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (e4m3 values, fp32 scales) with x ~= values * scales. ``dim`` None: one scale for the tensor (shape
    ()); else one per slice along every other dim, reduced over ``dim`` (kept as size 1: [rows, 1] for dim -1)."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = (amax.float() / FP8_E4M3_MAX).clamp_min(MIN_SCALE)
    return quantize_fp8_static(x, scale), scale


def quantize_fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale saturated to +-448 and rounded to e4m3 (a given scale: static activation scales)."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_E4M3)


if HAS_TRITON:

    @triton.jit
    def _per_token_quant_kernel(
        x_ptr,
        q_ptr,
        scale_ptr,
        num_cols,
        x_stride,
        q_stride,
        FP8_MAX: tl.constexpr,
        MIN_S: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        running = tl.zeros([BLOCK], tl.float32)
        for start in range(0, num_cols, BLOCK):
            mask = start + cols < num_cols
            x = tl.load(x_ptr + row * x_stride + start + cols, mask=mask, other=0.0).to(tl.float32)
            running = tl.maximum(running, tl.abs(x))
        scale = tl.maximum(tl.max(running, axis=0) / FP8_MAX, MIN_S)
        tl.store(scale_ptr + row, scale)
        for start in range(0, num_cols, BLOCK):
            mask = start + cols < num_cols
            x = tl.load(x_ptr + row * x_stride + start + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + row * q_stride + start + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M, K], fp32 scales [M, 1]); Triton on CUDA, the torch reference elsewhere."""
    if x.is_cuda and HAS_TRITON:
        return quantize_fp8_per_token_triton(x)
    return quantize_fp8(x, dim=-1)


def quantize_fp8_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton("quantize_fp8_per_token")
    if x.dim() != 2:
        raise ValueError(f"per-token FP8 quantization takes [rows, cols]; got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=FP8_E4M3, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        _per_token_quant_kernel[(rows,)](
            x, q, scales, cols, x.stride(0), q.stride(0),
            FP8_MAX=FP8_E4M3_MAX, MIN_S=MIN_SCALE, BLOCK=min(2048, next_power_of_2(cols)), num_warps=4,
        )
    return q, scales
