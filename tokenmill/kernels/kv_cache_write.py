"""KV-cache write (reshape_and_cache): scatter this step's keys/values into their paged-cache slots.

The layout is the cache object's (attention/kv_cache.py): the kernel takes its slot-major storage and the
K-to-V offset from it. A negative slot marks a padding token (CUDA-graph batches padded up to a captured size)
and is skipped. An FP8 cache stores each value divided by its layer's k or v scale (per tensor or per KV head),
saturated to the FP8 range.
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
    key: torch.Tensor, value: torch.Tensor, kv_cache: LayerKVCache | torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Pure-torch scatter of key/value [T, num_kv_heads, head_dim] into the cache; slots < 0 are skipped."""
    LayerKVCache.of(kv_cache).store_kv(key, value, slot_mapping, k_scale, v_scale)


def scale_launch_args(
    cache: LayerKVCache, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    """Kernel arguments for optional k/v scales: the two pointers (the cache itself when unscaled: never read)
    and constexprs SCALED, SCALE_STRIDE (0 per tensor, the head stride per head) and FP8_MAX (saturation)."""
    if k_scale is None or v_scale is None:
        return cache.kv, cache.kv, {"SCALED": False, "SCALE_STRIDE": 0, "FP8_MAX": 0.0}
    if k_scale.dtype != torch.float32 or v_scale.dtype != torch.float32 or k_scale.stride() != v_scale.stride():
        raise ValueError("k/v scales must be float32 tensors of one layout")
    stride = k_scale.stride(0) if k_scale.dim() else 0
    limit = float(torch.finfo(cache.spec.dtype).max) if cache.spec.dtype.is_floating_point else 0.0
    return k_scale, v_scale, {"SCALED": True, "SCALE_STRIDE": stride, "FP8_MAX": limit}


if HAS_TRITON:

    @triton.jit
    def quantize_kv(x, scale_ptr, heads, NUM_KV_HEADS: tl.constexpr, SCALE_STRIDE: tl.constexpr,
                    FP8_MAX: tl.constexpr):
        """x [H, D] of KV heads ``heads`` [H, 1] divided by their scale in fp32 and saturated to +-FP8_MAX
        (the torch reference's order: divide, clamp, then the caller's cast rounds)."""
        s = tl.load(scale_ptr + heads * SCALE_STRIDE, mask=heads < NUM_KV_HEADS, other=1.0)
        q = x.to(tl.float32) / s
        return tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)

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
        k_scale_ptr,
        v_scale_ptr,
        NUM_KV_HEADS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_D: tl.constexpr,
        SCALED: tl.constexpr,
        SCALE_STRIDE: tl.constexpr,
        FP8_MAX: tl.constexpr,
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
            if SCALED:
                k = quantize_kv(k, k_scale_ptr, heads, NUM_KV_HEADS, SCALE_STRIDE, FP8_MAX)
                v = quantize_kv(v, v_scale_ptr, heads, NUM_KV_HEADS, SCALE_STRIDE, FP8_MAX)
            dst = cache_ptr + slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
            tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + v_offset, v.to(cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: LayerKVCache | torch.Tensor, slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
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
    k_scale_arg, v_scale_arg, scaling = scale_launch_args(cache, k_scale, v_scale)
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
        k_scale_arg,
        v_scale_arg,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_power_of_2(num_kv_heads),
        BLOCK_D=next_power_of_2(head_dim),
        **scaling,
        **pdl_launch(key.device, num_tokens),
        num_warps=4,
    )
