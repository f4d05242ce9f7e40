"""Fused RMSNorm with optional residual add, as Llama's decoder layers use it.

With a residual, ``hidden = x + residual`` is returned alongside ``rms_norm(hidden) * weight`` so one pass
over memory replaces three (HF rounds the sum to the input dtype before normalizing; so do we).
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


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF LlamaRMSNorm semantics; returns ``out`` or ``(out, x + residual)``."""
    hidden = x if residual is None else x + residual
    h32 = hidden.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if residual is None else (out, hidden)


if HAS_TRITON:

    @triton.jit
    def _rms_norm_kernel(
        x_ptr,
        res_ptr,
        w_ptr,
        out_ptr,
        res_out_ptr,
        x_stride,
        res_stride,
        eps,
        N: tl.constexpr,
        BLOCK: tl.constexpr,
        HAS_RESIDUAL: tl.constexpr,
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
        normed = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * N + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


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
    hidden_size = x.shape[-1]
    x2 = x.reshape(-1, hidden_size)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
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
            x2.stride(0),
            res2.stride(0),
            eps,
            N=hidden_size,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            **pdl_launch(x.device, rows),
            num_warps=min(16, max(1, block // 256)),
        )
    return out if residual is None else (out, res_out)
