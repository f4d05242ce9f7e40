"""KV-cache write (reshape_and_cache): scatter this step's keys/values into their paged-cache slots.

The layout is the cache object's (attention/kv_cache.py): the kernel takes its slot-major storage and the
K-to-V offset from it. A negative slot marks a padding token (CUDA-graph batches padded up to a captured size)
and is skipped.
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


def reshape_and_cache_reference(
    key: torch.Tensor, value: torch.Tensor, kv_cache: LayerKVCache | torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Pure-torch scatter of key/value [T, num_kv_heads, head_dim] into the cache; slots < 0 are skipped."""
    LayerKVCache.of(kv_cache).store_kv(key, value, slot_mapping)


if HAS_TRITON:

    @triton.jit
    def _reshape_and_cache_kernel(
        key_ptr,
        value_ptr,
        cache_ptr,
        slot_ptr,
        key_stride_t,
        key_stride_h,
        value_stride_t,
        value_stride_h,
        v_offset,  # elements between K and V halves of the cache
        NUM_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_wait(PDL)
        token = tl.program_id(0)
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            heads = tl.arange(0, BLOCK_H)[:, None]
            dims = tl.arange(0, BLOCK_D)[None, :]
            mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
            k = tl.load(key_ptr + token * key_stride_t + heads * key_stride_h + dims, mask=mask)
            v = tl.load(value_ptr + token * value_stride_t + heads * value_stride_h + dims, mask=mask)
            dst = cache_ptr + slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
            tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + v_offset, v.to(cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: LayerKVCache | torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton scatter of key/value [T, num_kv_heads, head_dim] into the cache (one program per token)."""
    require_triton("reshape_and_cache")
    cache = LayerKVCache.of(kv_cache)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if not cache.is_slot_major():
        raise ValueError("the KV cache storage must be contiguous (slot-major rows of num_kv_heads * head_dim)")
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("key and value must have a contiguous last (head_dim) axis")
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        cache.kv,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        cache.v_offset,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
        **pdl_launch(key.device, num_tokens),
        num_warps=4,
    )
