"""Kernel-test helpers: the device Triton kernels run on, random paged batches, relative error.

Triton tests run on CUDA; with ``TRITON_INTERPRET=1`` and triton installed they also run on CPU through
Triton's interpreter (slow, used for debugging kernels without a GPU). Otherwise they skip.
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.intmath import cdiv
from tokenmill.kernels._triton import HAS_TRITON


def triton_device() -> str | None:
    if not HAS_TRITON:
        return None
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    return None


def fp8_device() -> str | None:
    """Where FP8 conversions run: CUDA sm89+ (Ada, Hopper), or CPU through Triton's interpreter."""
    if not HAS_TRITON:
        return None
    if torch.cuda.is_available():
        return "cuda" if torch.cuda.get_device_capability() >= (8, 9) else None
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


requires_triton_device = pytest.mark.skipif(
    triton_device() is None, reason="needs CUDA + triton (or TRITON_INTERPRET=1)"
)
requires_cuda = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA + triton"
)


@pytest.fixture
def device(request) -> str:
    """The test module's ``KERNEL_DEVICE`` function (e.g. ``fp8_device``), else ``triton_device``."""
    dev = getattr(request.module, "KERNEL_DEVICE", triton_device)()
    assert dev is not None
    return dev


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf so it never passes."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def make_paged_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int,
    spare_blocks: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random (query, key, value, kv_cache, meta) for sequences given as (context_len, query_len).

    The cache holds random context keys/values in shuffled blocks; unused slots are NaN so any read of a
    slot the kernel should not touch poisons the result.
    """
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    blocks_needed = [cdiv(ctx + q, block_size) for ctx, q in seqs]
    num_blocks = sum(blocks_needed) + spare_blocks
    order = list(range(num_blocks))
    rng.shuffle(order)
    tables, at = [], 0
    for n in blocks_needed:
        tables.append(order[at : at + n])
        at += n
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    flat = cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    for (ctx, _), table in zip(seqs, tables, strict=True):
        for pos in range(ctx):
            slot = table[pos // block_size] * block_size + pos % block_size
            flat[:, slot] = torch.randn(2, num_kv_heads, head_dim, generator=gen).to(dtype)
    total = sum(q for _, q in seqs)
    query = torch.randn(total, num_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    meta = AttentionMetadata.build(
        query_lens=[q for _, q in seqs],
        seq_lens=[ctx + q for ctx, q in seqs],
        block_tables=tables,
        block_size=block_size,
        device=device,
    )
    return query.to(device), key.to(device), value.to(device), cache.to(device), meta
