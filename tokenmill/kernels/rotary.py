"""Fused rotary position embedding (neox / HF Llama ``rotate_half`` style), in place on q and k.

``cos_sin_cache`` is [max_position, rotary_dim]: cos in the first half of each row, sin in the second; the
first ``rotary_dim`` channels of every head rotate, pairs (i, i + rotary_dim/2).
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


def rope_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """Plain RoPE inverse frequencies (fp32); scaled variants (llama3, yarn) build their own."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """[max_position, rotary_dim] fp32 table of cat(cos, sin) for the given inverse frequencies."""
    positions = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(positions, inv_freq.float())
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def _as_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x if x.dim() == 3 else x.view(x.shape[0], -1, head_dim)


def apply_rotary_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] (or [T, Hq*D]) and k in place; returns them for chaining."""
    rot = cos_sin_cache.shape[-1]
    half = rot // 2
    cos_sin = cos_sin_cache.index_select(0, positions.long()).float()
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    for x in (q, k):
        xh = _as_heads(x, rot)
        x1 = xh[..., :half].float()
        x2 = xh[..., half:rot].float()
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        xh[..., :rot] = rotated.to(x.dtype)
    return q, k


if HAS_TRITON:

    @triton.jit
    def load_cos_sin(cache_ptr, pos_ptr, token, cache_stride, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
        """fp32 cos and sin rows [1, BLOCK_HALF] of ``token``'s position."""
        pos = tl.load(pos_ptr + token).to(tl.int64)
        dims = tl.arange(0, BLOCK_HALF)[None, :]
        dmask = dims < HALF
        cos = tl.load(cache_ptr + pos * cache_stride + dims, mask=dmask, other=0.0).to(tl.float32)
        sin = tl.load(cache_ptr + pos * cache_stride + HALF + dims, mask=dmask, other=0.0).to(tl.float32)
        return cos, sin

    @triton.jit
    def rotate_heads(
        x_ptr,
        token,
        stride_t,
        stride_h,
        cos,
        sin,
        NUM_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        heads = tl.arange(0, BLOCK_H)[:, None]
        dims = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (heads < NUM_HEADS) & (dims < HALF)
        base = x_ptr + token * stride_t + heads * stride_h + dims
        x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(base, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(base + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr,
        k_ptr,
        pos_ptr,
        cache_ptr,
        q_stride_t,
        q_stride_h,
        k_stride_t,
        k_stride_h,
        cache_stride,
        NUM_Q_HEADS: tl.constexpr,
        NUM_K_HEADS: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_QH: tl.constexpr,
        BLOCK_KH: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        token = tl.program_id(0).to(tl.int64)
        cos, sin = load_cos_sin(cache_ptr, pos_ptr, token, cache_stride, HALF, BLOCK_HALF)
        rotate_heads(q_ptr, token, q_stride_t, q_stride_h, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
        rotate_heads(k_ptr, token, k_stride_t, k_stride_h, cos, sin, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One program per token rotates all its q and k heads in place."""
    require_triton("apply_rotary")
    rot = cos_sin_cache.shape[-1]
    qh, kh = _as_heads(q, rot), _as_heads(k, rot)
    if qh.stride(-1) != 1 or kh.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache must have a contiguous last axis")
    num_tokens = qh.shape[0]
    if num_tokens > 0:
        half = rot // 2
        _rotary_kernel[(num_tokens,)](
            qh,
            kh,
            positions,
            cos_sin_cache,
            qh.stride(0),
            qh.stride(1),
            kh.stride(0),
            kh.stride(1),
            cos_sin_cache.stride(0),
            NUM_Q_HEADS=qh.shape[1],
            NUM_K_HEADS=kh.shape[1],
            HALF=half,
            BLOCK_QH=next_power_of_2(qh.shape[1]),
            BLOCK_KH=next_power_of_2(kh.shape[1]),
            BLOCK_HALF=next_power_of_2(half),
            **pdl_launch(qh.device, num_tokens),
            num_warps=4,
        )
    return q, k
