"""Fused SiLU-and-mul for the gated MLP: ``silu(x[..., :I]) * x[..., I:]`` in one pass.

The gate half comes first, as a fused gate_up projection lays it out (HF: act(gate_proj(x)) * up_proj(x)).

``silu_and_mul_fp8_triton``: one program holds a whole row (up to ``FP8_ACT_MAX_COLS`` outputs), so it can also
quantize it to e4m3 with its per-row absmax for a W8A8 down projection with dynamic per-token scales, saving the
separate quantization pass (kernels/fp8_quant.py). The product is rounded to the input dtype first, so the codes are
the unfused pair's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels._triton import (
    HAS_TRITON,
    next_power_of_2,
    pdl_launch,
    pdl_wait,
    require_triton,
    tl,
    triton,
)
from tokenmill.kernels.fp8_quant import (
    FP8_E4M3,
    FP8_E4M3_MAX,
    MIN_SCALE,
    Fp8Tokens,
    quantize_fp8,
    quantize_fp8_per_token_triton,
)

# Widest output row one program holds in registers (fp32 gate, up and product at 32 a thread with 32 warps);
# wider rows take the two-kernel path.
FP8_ACT_MAX_COLS = 32768


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_fp8_reference(x: torch.Tensor) -> Fp8Tokens:
    """The unfused composition: per-token e4m3 of silu(gate) * up in x's dtype; x [T, 2I]."""
    values, scales = quantize_fp8(silu_and_mul_reference(x), dim=-1)
    return Fp8Tokens(values, scales, x.dtype)


if HAS_TRITON:

    @triton.jit
    def _silu_and_mul_kernel(
        x_ptr, out_ptr, x_stride, INTER: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False
    ):
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < INTER
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + INTER + cols, mask=mask, other=0.0).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate))
        tl.store(out_ptr + row * INTER + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_fp8_kernel(
        x_ptr, q_ptr, scale_ptr, x_stride, INTER: tl.constexpr, BLOCK: tl.constexpr, FP8_MAX: tl.constexpr,
        MIN_S: tl.constexpr, PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < INTER
        gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * x_stride + INTER + cols, mask=mask, other=0.0).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate))
        y = (act * up).to(x_ptr.dtype.element_ty).to(tl.float32)  # the unfused output's rounding
        scale = tl.maximum(tl.max(tl.abs(y), axis=0) / FP8_MAX, MIN_S)  # padding columns are 0
        tl.store(scale_ptr + row, scale)
        q = tl.minimum(tl.maximum(y / scale, -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * INTER + cols, q.to(q_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    require_triton("silu_and_mul")
    width = x.shape[-1]
    if width % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension (gate and up halves); got {width}")
    inter = width // 2
    x2 = x.reshape(-1, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    rows = x2.shape[0]
    if rows > 0:
        block = 1024
        _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
            x2, out, x2.stride(0), INTER=inter, BLOCK=block, **pdl_launch(x.device, rows), num_warps=4
        )
    return out


def silu_and_mul_fp8_triton(x: torch.Tensor, num_warps: int | None = None) -> Fp8Tokens:
    """Per-token e4m3 of silu(gate) * up, one program per row; x [T, 2I]. Rows wider than FP8_ACT_MAX_COLS: the
    plain kernel, then the per-token quantization kernel (same codes). ``num_warps``: 32 elements a thread unless
    given (benchmarks/gpu_fp8_fuse.py sweeps it)."""
    require_triton("silu_and_mul_fp8")
    if x.dim() != 2 or x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul_fp8 takes [tokens, 2 * intermediate]; got shape {tuple(x.shape)}")
    inter = x.shape[-1] // 2
    if inter > FP8_ACT_MAX_COLS:
        return Fp8Tokens(*quantize_fp8_per_token_triton(silu_and_mul_triton(x)), x.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    values = torch.empty((rows, inter), dtype=FP8_E4M3, device=x.device)
    scales = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows > 0:
        block = next_power_of_2(inter)
        _silu_and_mul_fp8_kernel[(rows,)](
            x, values, scales, x.stride(0), INTER=inter, BLOCK=block, FP8_MAX=FP8_E4M3_MAX, MIN_S=MIN_SCALE,
            **pdl_launch(x.device, rows), num_warps=num_warps or min(32, max(4, block // 1024)),
        )
    return Fp8Tokens(values, scales, x.dtype)
