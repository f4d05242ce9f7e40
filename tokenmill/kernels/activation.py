"""Fused SiLU-and-mul for the gated MLP: ``silu(x[..., :I]) * x[..., I:]`` in one pass.

The gate half comes first, as a fused gate_up projection lays it out (HF: act(gate_proj(x)) * up_proj(x)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels._triton import HAS_TRITON, pdl_launch, pdl_wait, require_triton, tl, triton


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


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
