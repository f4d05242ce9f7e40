"""The fused ops the model calls: Triton on CUDA tensors (when Triton imports), torch references elsewhere.

The model layer code stays device-agnostic; these functions are the only switch point. The ``_fp8`` variants hand
a W8A8 linear its input already quantized per token (``Fp8Tokens``); their references are the unfused composition.
"""

from __future__ import annotations

import torch

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.activation import (
    silu_and_mul_fp8_reference,
    silu_and_mul_fp8_triton,
    silu_and_mul_reference,
    silu_and_mul_triton,
)
from tokenmill.kernels.fp8_quant import Fp8Tokens
from tokenmill.kernels.rms_norm import (
    rms_norm_fp8_reference,
    rms_norm_fp8_triton,
    rms_norm_reference,
    rms_norm_triton,
)
from tokenmill.kernels.rotary import apply_rotary_reference, apply_rotary_triton


def _use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON and x.is_cuda


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm(x [+ residual]) * weight; with a residual returns ``(normed, x + residual)``."""
    if _use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_reference(x, weight, eps, residual)


def rms_norm_fp8(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[Fp8Tokens, torch.Tensor]:
    """(per-token e4m3 of RMSNorm(x [+ residual]) * weight, x [+ residual]) for x [T, H]."""
    if _use_triton(x):
        return rms_norm_fp8_triton(x, weight, eps, residual)
    return rms_norm_fp8_reference(x, weight, eps, residual)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style RoPE in place on q [T, Hq, D] and k [T, Hkv, D] (2-D [T, H*D] when rotary_dim == D)."""
    if _use_triton(q):
        return apply_rotary_triton(q, k, positions, cos_sin_cache)
    return apply_rotary_reference(q, k, positions, cos_sin_cache)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] for x [..., 2I]."""
    if _use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_reference(x)


def silu_and_mul_fp8(x: torch.Tensor) -> Fp8Tokens:
    """Per-token e4m3 of silu(x[:, :I]) * x[:, I:] for x [T, 2I]."""
    if _use_triton(x):
        return silu_and_mul_fp8_triton(x)
    return silu_and_mul_fp8_reference(x)
