"""Split-K linear through cuBLAS: y = x W^T (+ b) as S batched products over K slices, summed in fp32.

At a few hundred rows a projection with a narrow output (Llama-3-8B's o_proj: 256 × 4096 outputs) gives cuBLAS
too few output tiles to fill 132 SMs, and it runs well below the matmul rate. Cutting K into S slices makes S
times the tiles; the slices' fp32 partials (``bmm`` with ``out_dtype=float32``, no rounding in between) are summed
and rounded once, so the result is as precise as one fp32-accumulated product. Views only: no copy of x or W.
The runner's start-up tuning decides per weight shape and row count whether it beats a plain ``F.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SplitK:
    splits: int

    @property
    def name(self) -> str:
        return f"splitk{self.splits}"

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return split_k_linear(x, weight, bias, self.splits)


SPLIT_K_CANDIDATES = (SplitK(2), SplitK(3), SplitK(4))


def split_k_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, splits: int) -> torch.Tensor:
    """x [M, K] times weight [N, K]^T over ``splits`` equal K slices (K % splits == 0), in x's dtype (CUDA only)."""
    m, k = x.shape
    n = weight.shape[0]
    if splits < 2 or k % splits:
        raise ValueError(f"split_k_linear needs splits >= 2 dividing K; got splits={splits}, K={k}")
    if weight.shape[1] != k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"split_k_linear needs x [M, K] and weight [N, K] with contiguous rows; got "
                         f"{tuple(x.shape)}, {tuple(weight.shape)}")
    part = k // splits
    xs = x.view(m, splits, part).transpose(0, 1)  # [S, M, K/S], strides (K/S, K, 1)
    ws = weight.view(n, splits, part).transpose(0, 1).transpose(1, 2)  # [S, K/S, N]
    partials = torch.bmm(xs, ws, out_dtype=torch.float32)  # [S, M, N]
    out = partials.sum(0)
    if bias is not None:
        out += bias
    return out.to(x.dtype)
