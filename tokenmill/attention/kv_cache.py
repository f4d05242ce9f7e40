"""The paged KV cache: one object per engine, one view per layer, and the torch reference of its layout.

Each layer stores K and V in one tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K at 0, V at 1);
token ``slot = block_id * block_size + offset``. ``LayerKVCache.store_kv`` / ``gather_kv`` are the one torch
statement of that layout: the references and the CPU backend call them, and the Triton kernels take the
view's tensors and strides (``k_cache``, ``v_cache``, ``v_offset``, ``block_stride`` ...) instead of assuming
them. Scales (FP8 KV) are the model's: ``store_kv`` divides by them, saturates to the FP8 range and rounds
(CPU torch casts to float8 natively, so FP8 runs emulated there), ``gather_kv`` multiplies back.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from tokenmill.config import FP8_DTYPES, KVCacheSpec


def _scaled(t: torch.Tensor, scale: torch.Tensor | None, divide: bool) -> torch.Tensor:
    """``t`` [..., num_kv_heads, head_dim] divided (store) or multiplied (gather) by a per-tensor or per-head
    scale, in fp32; unchanged without a scale."""
    if scale is None:
        return t
    s = scale.float().reshape(-1, 1) if scale.dim() else scale.float()  # per head: [H, 1] broadcasts over D
    return t.float() / s if divide else t.float() * s


def to_cache_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``t`` to the storage dtype; FP8 saturates at its largest finite value (as the kernels' casts do)
    instead of turning an outlier into NaN."""
    if dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        return t.float().clamp(-limit, limit).to(dtype)
    return t.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 storage as bytes: CPU torch has no index_copy_ for float8, and a byte copy is the same copy."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def check_fp8_device(dtype: torch.dtype, device: torch.device | str) -> None:
    """FP8 storage on CUDA needs the float8 conversions of sm89+ (Ada, Hopper); ValueError elsewhere."""
    device = torch.device(device)
    if dtype not in FP8_DTYPES or device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"an FP8 KV cache needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --kv-cache-dtype auto")


class LayerKVCache:
    """One layer's K/V storage and its layout facts. Wraps an existing tensor (no copy)."""

    def __init__(self, kv: torch.Tensor, spec: KVCacheSpec | None = None) -> None:
        if kv.dim() != 5 or kv.shape[0] != 2:
            raise ValueError(f"a layer's KV cache is [2, num_blocks, block_size, num_kv_heads, head_dim]; "
                             f"got shape {tuple(kv.shape)}")
        if spec is None:
            spec = KVCacheSpec(kv.shape[2], kv.shape[3], kv.shape[4], kv.dtype)
        if tuple(kv.shape[2:]) != (spec.block_size, spec.num_kv_heads, spec.head_dim) or kv.dtype != spec.dtype:
            raise ValueError(f"KV tensor {tuple(kv.shape)} {kv.dtype} does not match {spec}")
        self.kv = kv
        self.spec = spec
        # FP8: the next forward that stores into this layer sets its k/v scales from those keys/values first
        # (--calculate-kv-scales; armed by KVCache.arm_scale_calculation, cleared once done).
        self.calculate_scales = False

    @classmethod
    def of(cls, cache: torch.Tensor | LayerKVCache) -> LayerKVCache:
        """The view itself, or a view wrapping a bare layer tensor (kernel tests and benchmarks pass those)."""
        return cache if isinstance(cache, LayerKVCache) else cls(cache)

    # ---- layout facts the kernels read ---------------------------------------------------------------
    @property
    def k_cache(self) -> torch.Tensor:  # [num_blocks, block_size, num_kv_heads, head_dim]
        return self.kv[0]

    @property
    def v_cache(self) -> torch.Tensor:
        return self.kv[1]

    @property
    def num_blocks(self) -> int:
        return self.kv.shape[1]

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def num_kv_heads(self) -> int:
        return self.spec.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    @property
    def v_offset(self) -> int:
        """Elements from a K element to the V element of the same slot (kernels index both off one pointer)."""
        return self.kv.stride(0)

    @property
    def strides(self) -> tuple[int, int, int]:
        """Elements between consecutive blocks, tokens of a block, and KV heads of a token."""
        return self.kv.stride(1), self.kv.stride(2), self.kv.stride(3)

    def is_slot_major(self) -> bool:
        """Slots are dense rows of ``num_kv_heads * head_dim`` (what the write kernels' slot arithmetic needs)."""
        return self.kv.is_contiguous()

    # ---- the torch reference of the layout -----------------------------------------------------------
    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        has_padding: bool = True,
    ) -> None:
        """Scatter key/value [T, num_kv_heads, head_dim] into their slots; slots < 0 (padding) are skipped.
        ``has_padding=False``: the caller knows every slot is >= 0 (saves the filtering, a CPU decode's hot path)."""
        slots_total = self.num_blocks * self.block_size
        flat = self.kv.view(2, slots_total, self.num_kv_heads, self.head_dim)
        if has_padding:
            keep = slot_mapping >= 0
            slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
        dtype = self.spec.dtype
        _bits(flat[0]).index_copy_(0, slot_mapping, _bits(to_cache_dtype(_scaled(key, k_scale, True), dtype)))
        _bits(flat[1]).index_copy_(0, slot_mapping, _bits(to_cache_dtype(_scaled(value, v_scale, True), dtype)))

    def gather_kv(
        self,
        block_table: torch.Tensor,
        seq_len: int,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [seq_len, num_kv_heads, head_dim] of one sequence in position order (storage
        dtype; fp32 when dequantized by a scale)."""
        keys, values = self.gather_kv_padded(block_table[None], seq_len, k_scale, v_scale)
        return keys[0, :seq_len], values[0, :seq_len]

    def gather_kv_padded(
        self,
        block_tables: torch.Tensor,
        max_seq_len: int,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [num_seqs, L, num_kv_heads, head_dim] of every row of ``block_tables``, with L
        ``max_seq_len`` rounded up to whole blocks; positions past a sequence's length hold whatever its
        table's padding points at (callers mask them)."""
        num_blocks = self.spec.blocks_for_tokens(max_seq_len)
        tables = block_tables[:, :num_blocks].long()
        shape = (tables.shape[0], num_blocks * self.block_size, self.num_kv_heads, self.head_dim)
        keys = self.k_cache[tables].reshape(shape)
        values = self.v_cache[tables].reshape(shape)
        return _scaled(keys, k_scale, divide=False), _scaled(values, v_scale, divide=False)


class KVCache:
    """Every layer's paged K/V for one engine (or one tensor-parallel rank's heads).

    Iterating yields the per-layer views the model hands to its attention layers, in layer order.
    Zero-filled, not empty: batched reference paths multiply masked-out slots by a zero weight, and
    uninitialised memory can hold NaN bit patterns (0 * NaN = NaN).
    """

    def __init__(self, spec: KVCacheSpec, num_layers: int, num_blocks: int, device: torch.device | str) -> None:
        if num_layers < 1 or num_blocks < 1:
            raise ValueError(f"a KV cache needs >= 1 layer and block; got {num_layers} layers, {num_blocks} blocks")
        check_fp8_device(spec.dtype, device)
        self.spec = spec
        self.num_blocks = num_blocks
        shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.layers = [LayerKVCache(torch.zeros(shape, dtype=spec.dtype, device=device), spec)
                       for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(spec: KVCacheSpec, num_layers: int) -> int:
        """Bytes one block costs across every layer (what KV sizing divides the budget by)."""
        return spec.bytes_per_block * num_layers

    def __len__(self) -> int:
        return len(self.layers)

    def arm_scale_calculation(self) -> None:
        """FP8: every layer sets its k/v scales from the next keys/values it stores (the first real step: the
        engine arms this after warm-up and graph capture, whose inputs are dummies)."""
        if self.spec.scale_granularity is None:
            raise ValueError("calculate_kv_scales needs an FP8 KV cache (--kv-cache-dtype fp8)")
        for layer in self.layers:
            layer.calculate_scales = True

    def __iter__(self) -> Iterator[LayerKVCache]:
        return iter(self.layers)

    def __getitem__(self, layer: int) -> LayerKVCache:
        return self.layers[layer]

    def k_cache(self, layer: int) -> torch.Tensor:
        return self.layers[layer].k_cache

    def v_cache(self, layer: int) -> torch.Tensor:
        return self.layers[layer].v_cache

    def store_kv(
        self,
        layer: int,
        key: torch.Tensor,
        value: torch.Tensor,
        slot_mapping: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        self.layers[layer].store_kv(key, value, slot_mapping, k_scale, v_scale)
