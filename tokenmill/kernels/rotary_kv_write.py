"""Rotary embedding fused with the KV-cache write: one program per token rotates its query heads in place and
writes its rotated keys and its values into the token's cache slot.

Separately, the rotary kernel wrote k back and the cache write read it again; fused, one launch per layer
goes away (each is a ~2 µs kernel on the H100 at decode batch sizes, 32 per Llama-3-8B step) and k is not
written back (the Triton attention kernels read keys from the cache only). Full-width rotary only
(rotary_dim == head_dim, as every model here uses); a negative slot (CUDA-graph padding) still rotates q.
"""

from __future__ import annotations

import torch

from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.kernels._triton import (
    HAS_TRITON,
    next_power_of_2,
    pdl_launch,
    pdl_wait,
    require_triton,
    tl,
    triton,
)
from tokenmill.kernels.kv_cache_write import reshape_and_cache_reference, scale_launch_args
from tokenmill.kernels.rotary import apply_rotary_reference

if HAS_TRITON:
    from tokenmill.kernels.kv_cache_write import quantize_kv
    from tokenmill.kernels.rotary import load_cos_sin, rotate_heads


def rotary_and_cache_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: LayerKVCache | torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Rotate query and key in place (fp32 math), then scatter key/value into the cache (divided by the
    scales of an FP8 cache)."""
    apply_rotary_reference(query, key, positions, cos_sin_cache)
    reshape_and_cache_reference(key, value, kv_cache, slot_mapping, k_scale, v_scale)


if HAS_TRITON:

    @triton.jit
    def _rotary_kv_write_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        pos_ptr,
        slot_ptr,
        cos_sin_ptr,
        cache_ptr,
        q_stride_t,
        q_stride_h,
        k_stride_t,
        k_stride_h,
        v_stride_t,
        v_stride_h,
        cos_sin_stride,
        v_offset,  # elements between the K and V halves of the cache
        k_scale_ptr,
        v_scale_ptr,
        NUM_Q_HEADS: tl.constexpr,
        NUM_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_QH: tl.constexpr,
        BLOCK_KH: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        SCALED: tl.constexpr,
        SCALE_STRIDE: tl.constexpr,
        FP8_MAX: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        HALF: tl.constexpr = HEAD_DIM // 2
        token = tl.program_id(0).to(tl.int64)
        cos, sin = load_cos_sin(cos_sin_ptr, pos_ptr, token, cos_sin_stride, HALF, BLOCK_HALF)
        rotate_heads(q_ptr, token, q_stride_t, q_stride_h, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
        dims = tl.arange(0, BLOCK_HALF)[None, :]
        dmask = dims < HALF

        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            kh = tl.arange(0, BLOCK_KH)[:, None]
            kmask = (kh < NUM_KV_HEADS) & dmask
            k_base = k_ptr + token * k_stride_t + kh * k_stride_h + dims
            k1 = tl.load(k_base, mask=kmask, other=0.0).to(tl.float32)
            k2 = tl.load(k_base + HALF, mask=kmask, other=0.0).to(tl.float32)
            # Rounded to the activation dtype first, as the separate rotary kernel did, then to the cache's.
            r1 = (k1 * cos - k2 * sin).to(k_ptr.dtype.element_ty)
            r2 = (k2 * cos + k1 * sin).to(k_ptr.dtype.element_ty)
            v_base = v_ptr + token * v_stride_t + kh * v_stride_h + dims
            v1 = tl.load(v_base, mask=kmask, other=0.0)
            v2 = tl.load(v_base + HALF, mask=kmask, other=0.0)
            if SCALED:  # FP8 cache: divided by the layer's scales and saturated before the cast rounds
                r1 = quantize_kv(r1, k_scale_ptr, kh, NUM_KV_HEADS, SCALE_STRIDE, FP8_MAX)
                r2 = quantize_kv(r2, k_scale_ptr, kh, NUM_KV_HEADS, SCALE_STRIDE, FP8_MAX)
                v1 = quantize_kv(v1, v_scale_ptr, kh, NUM_KV_HEADS, SCALE_STRIDE, FP8_MAX)
                v2 = quantize_kv(v2, v_scale_ptr, kh, NUM_KV_HEADS, SCALE_STRIDE, FP8_MAX)
            dst = cache_ptr + slot * (NUM_KV_HEADS * HEAD_DIM) + kh * HEAD_DIM + dims
            tl.store(dst, r1.to(cache_ptr.dtype.element_ty), mask=kmask)
            tl.store(dst + HALF, r2.to(cache_ptr.dtype.element_ty), mask=kmask)
            tl.store(dst + v_offset, v1.to(cache_ptr.dtype.element_ty), mask=kmask)
            tl.store(dst + v_offset + HALF, v2.to(cache_ptr.dtype.element_ty), mask=kmask)


def rotary_and_cache(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: LayerKVCache | torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """query [T, Hq, D] rotated in place; rotated key [T, Hkv, D] and value written to their cache slots.

    ``key`` itself is left unrotated. Needs cos_sin_cache [max_position, D] (rotary over the whole head).
    """
    require_triton("rotary_and_cache")
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if cos_sin_cache.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"rotary_and_cache needs an even head_dim rotated whole; got rotary dim "
                         f"{cos_sin_cache.shape[-1]} for head_dim {head_dim}")
    cache = LayerKVCache.of(kv_cache)
    if key.shape != value.shape or key.shape[2] != head_dim or (cache.num_kv_heads, cache.head_dim) != (
        num_kv_heads, head_dim
    ):
        raise ValueError(f"key/value {tuple(key.shape)}/{tuple(value.shape)} do not match the cache "
                         f"{cache.spec} or head_dim {head_dim}")
    if not cache.is_slot_major():
        raise ValueError("the KV cache storage must be contiguous (slot-major rows of num_kv_heads * head_dim)")
    if query.stride(2) != 1 or key.stride(2) != 1 or value.stride(2) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("query, key, value and cos_sin_cache need a contiguous last axis")
    if num_tokens == 0:
        return
    k_scale_arg, v_scale_arg, scaling = scale_launch_args(cache, k_scale, v_scale)
    _rotary_kv_write_kernel[(num_tokens,)](
        query, key, value, positions, slot_mapping, cos_sin_cache, cache.kv,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos_sin_cache.stride(0), cache.v_offset, k_scale_arg, v_scale_arg,
        NUM_Q_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_QH=next_power_of_2(num_heads),
        BLOCK_KH=next_power_of_2(num_kv_heads),
        BLOCK_HALF=next_power_of_2(head_dim // 2),
        **scaling,
        **pdl_launch(query.device, num_tokens),
        num_warps=4,
    )
