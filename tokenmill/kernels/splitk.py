"""Split-K reduction inside one kernel launch, for the weight-streaming GEMVs (kernels/wna16_splitk.py, fp8_gemv.py).

A decode GEMV has too few output tiles to fill 132 SMs, so each output tile's K range is split over ``SPLIT_K``
programs. Instead of fp32 atomics into a zeroed buffer plus a cast kernel (three launches), every program stores
its fp32 partial tile into a workspace and bumps the tile's arrival counter; the program that arrives last sums the
partials in split order (deterministic), adds the bias, writes the output in its dtype and resets the counter to
zero for the next launch. One launch, no memset, capturable in a CUDA graph.

The workspace is one per device, allocated once at a fixed size and never grown (a CUDA graph keeps the pointers
it captured), so launchers cap ``split_k`` to what fits (``fit_split_k``). Kernels sharing it must run in stream
order, as a model's layers do.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from tokenmill.kernels._triton import HAS_TRITON, tl, triton

PARTIAL_ELEMENTS = 1 << 21  # fp32 partial sums (8 MB): split_k * rows * N must fit
COUNTERS = 1 << 15  # output tiles a launch may split


KINDS = ("rows", "fma", "dot", "dot_k")


@dataclass(frozen=True)
class SplitKConfig:
    """A split-K kernel's tiles and variant (``kind``):

    - ``rows``: fp32 FMAs, one accumulator tile per row of x (``block_m`` 1, 2 or 4), all in the weight tile's
      register layout (no layout conversion);
    - ``fma``: fp32 FMAs on a [block_m, k, n] product (any ``block_m``);
    - ``dot``: tensor-core products (``block_m`` >= 16) straight from the tile as loaded;
    - ``dot_k``: tensor-core products after reordering the tile into K order (one product per K step; W4A16/W8A16).

    ``prefetch`` loads the next K step's tile before using this one (two tiles in flight per program; not yet
    timed on a GPU).
    """

    block_m: int = 1
    block_n: int = 64
    block_k: int = 128
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 2
    kind: str = "rows"
    prefetch: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"split-K kernel kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "rows" and self.block_m not in (1, 2, 4):
            raise ValueError(f"the 'rows' kernel keeps 1, 2 or 4 rows per program; got block_m {self.block_m}")

    @property
    def dot(self) -> bool:
        return self.kind.startswith("dot")

    @property
    def name(self) -> str:
        return (f"{self.kind}_m{self.block_m}_n{self.block_n}_k{self.block_k}_s{self.split_k}_w{self.num_warps}"
                f"_st{self.num_stages}{'_pf' if self.prefetch else ''}")


@dataclass(frozen=True)
class SplitKWorkspace:
    partials: torch.Tensor  # fp32 [PARTIAL_ELEMENTS]
    counters: torch.Tensor  # int32 [COUNTERS], zero between launches


@functools.cache
def _workspace(device: torch.device) -> SplitKWorkspace:
    return SplitKWorkspace(torch.empty(PARTIAL_ELEMENTS, dtype=torch.float32, device=device),
                           torch.zeros(COUNTERS, dtype=torch.int32, device=device))


def splitk_workspace(device: torch.device) -> SplitKWorkspace:
    """The device's workspace (made on first use: call once before capturing a CUDA graph)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _workspace(device)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether bf16 ``tl.dot`` operands must go in as fp32: Triton's interpreter (TRITON_INTERPRET=1, the CPU
    check of these kernels) multiplies bf16's raw uint16 storage instead of its values."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def fit_split_k(split_k: int, rows: int, n: int, tiles: int, steps: int) -> int:
    """``split_k`` lowered until the partials and counters fit the workspace and every split has a K step."""
    split_k = max(1, min(split_k, steps))
    while split_k > 1 and (split_k * rows * n > PARTIAL_ELEMENTS or tiles > COUNTERS):
        split_k //= 2
    return split_k


if HAS_TRITON:

    @triton.jit
    def stack_rows(acc0, acc1, acc2, acc3, AXIS: tl.constexpr, BLOCK_M: tl.constexpr):
        """The ``rows`` kind's per-row accumulator tiles, each summed over its K ``AXIS``, as one [BLOCK_M, N]
        tile (rows past BLOCK_M are unused)."""
        r = tl.arange(0, BLOCK_M)[:, None]
        result = tl.where(r == 0, tl.sum(acc0, axis=AXIS)[None, :], 0.0)
        if BLOCK_M > 1:
            result += tl.where(r == 1, tl.sum(acc1, axis=AXIS)[None, :], 0.0)
        if BLOCK_M > 2:
            result += tl.where(r == 2, tl.sum(acc2, axis=AXIS)[None, :], 0.0)
            result += tl.where(r == 3, tl.sum(acc3, axis=AXIS)[None, :], 0.0)
        return result

    @triton.jit
    def splitk_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Rows, channels and their masks of program (tile, K split)'s output tile; row tiles vary fastest, so
        programs sharing a weight tile run together (L2 reuse)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = (pid // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
        return m, n, m < M, n < N

    @triton.jit
    def splitk_finish(acc, b_ptr, out_ptr, part_ptr, cnt_ptr, m, n, M, N, stride_om, tile, pid_k,
                      HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
        """Store ``acc`` [BLOCK_M, BLOCK_N] (fp32) as the output tile: directly without a split; otherwise as this
        split's partial, the last program of the tile summing all partials in split order."""
        mmask = m < M
        nmask = n < N
        omask = mmask[:, None] & nmask[None, :]
        out_ptrs = out_ptr + m[:, None] * stride_om + n[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            part = part_ptr + m[:, None] * N + n[None, :]
            tl.store(part + pid_k * M * N, acc, mask=omask)
            tl.debug_barrier()  # every thread's partial is written before the counter is released
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT_K):
                    total += tl.load(part + s * M * N, mask=omask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=omask)
                tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")
