"""Fused RMSNorm with optional residual add, as Llama's decoder layers use it.

With a residual, ``hidden = x + residual`` is returned alongside ``rms_norm(hidden) * weight`` so one pass
over memory replaces three (HF rounds the sum to the input dtype before normalizing; so do we).

``rms_norm_fp8_triton``: the same program also quantizes its output row to e4m3 with one fp32 scale per row (the
row is in registers, so its absmax costs nothing), for a W8A8 linear with dynamic per-token scales: the separate
per-token quantization pass (kernels/fp8_quant.py) goes away. The output is rounded to the input dtype before it
is quantized, so the codes are those of the unfused pair (norm, then quantize_fp8_per_token).
"""

from __future__ import annotations

import torch

from tokenmill.kernels._triton import (
    HAS_TRITON,
    next_power_of_2,
    pdl_launch,
    pdl_wait,
    require_triton,
    tl,
    triton,
)
from tokenmill.kernels.fp8_quant import FP8_E4M3, FP8_E4M3_MAX, MIN_SCALE, Fp8Tokens, quantize_fp8


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF LlamaRMSNorm semantics; returns ``out`` or ``(out, x + residual)``."""
    hidden = x if residual is None else x + residual
    h32 = hidden.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if residual is None else (out, hidden)


def rms_norm_fp8_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[Fp8Tokens, torch.Tensor]:
    """The unfused composition: (per-token e4m3 of norm(x [+ residual]) in x's dtype, x [+ residual]); x [T, H]."""
    out = rms_norm_reference(x, weight, eps, residual)
    out, hidden = (out, x) if residual is None else out
    values, scales = quantize_fp8(out, dim=-1)
    return Fp8Tokens(values, scales, x.dtype), hidden


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        scale_ptr,
        x_stride,
        res_stride,
        eps,
        N: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
        FP8_OUT: tl.constexpr = False,  # out_ptr is e4m3, scale_ptr gets one fp32 scale per row
        FP8_MAX: tl.constexpr = 448.0,
        MIN_S: tl.constexpr = 1e-12,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
            hidden = (x + r).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * N + cols, hidden, mask=mask)
            x = hidden.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        # rounded to the activations' dtype twice, as the reference (and the unfused bf16 output) is
        normed = (x * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
        y = (normed * w).to(x_ptr.dtype.element_ty)
        if FP8_OUT:
            y = y.to(tl.float32)
            scale = tl.maximum(tl.max(tl.abs(y), axis=0) / FP8_MAX, MIN_S)  # padding columns are 0
            tl.store(scale_ptr + row, scale)
            y = tl.minimum(tl.maximum(y / scale, -FP8_MAX), FP8_MAX)
        tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One program per row; outputs are new contiguous tensors unless ``out``/``residual_out`` are given."""
    require_triton("rms_norm")
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    res_out = _launch(x, weight, eps, residual, out, residual_out, None)
    return out if residual is None else (out, res_out)


def rms_norm_fp8_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> tuple[Fp8Tokens, torch.Tensor]:
    """(per-token e4m3 of norm(x [+ residual]), x [+ residual]) in one program per row; x [T, H]. ``num_warps``:
    the bf16 kernel's choice unless given (benchmarks/gpu_fp8_fuse.py sweeps it)."""
    require_triton("rms_norm_fp8")
    if x.dim() != 2:
        raise ValueError(f"rms_norm_fp8 takes [tokens, hidden]; got shape {tuple(x.shape)}")
    values = torch.empty(x.shape, dtype=FP8_E4M3, device=x.device)
    scales = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    hidden = _launch(x, weight, eps, residual, values, None, scales, num_warps)
    return Fp8Tokens(values, scales, x.dtype), x if residual is None else hidden


def _launch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None, out: torch.Tensor,
    residual_out: torch.Tensor | None, fp8_scales: torch.Tensor | None, num_warps: int | None = None,
) -> torch.Tensor:
    """Run the kernel into ``out`` (e4m3 with ``fp8_scales``); returns the x + residual rows (x without one)."""
    hidden_size = x.shape[-1]
    x2 = x.reshape(-1, hidden_size)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    res2 = x2
    res_out = out
    if residual is not None:
        res2 = residual.reshape(-1, hidden_size)
        if res2.stride(-1) != 1:
            res2 = res2.contiguous()
        res_out = (
            residual_out if residual_out is not None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
        )
    rows = x2.shape[0]
    if rows > 0:
        block = next_power_of_2(hidden_size)
        _rms_norm_kernel[(rows,)](
            x2,
            res2,
            weight,
            out,
            res_out,
            fp8_scales if fp8_scales is not None else out,
            x2.stride(0),
            res2.stride(0),
            eps,
            N=hidden_size,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            FP8_OUT=fp8_scales is not None,
            FP8_MAX=FP8_E4M3_MAX,
            MIN_S=MIN_SCALE,
            **pdl_launch(x.device, rows),
            num_warps=num_warps or min(16, max(1, block // 256)),
        )
    return res_out
