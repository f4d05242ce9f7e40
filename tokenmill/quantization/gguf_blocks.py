"""GGUF block bytes -> the (codes, scales, zeros) of the W4A16 / W8A16 layout (kernels/wna16_gemm.py), per type.

Every supported type is an affine code per group of input channels, w = (code - zero) * scale, so it maps onto
the kernel layout without loss; only the group size and code width differ:

- Q4_0 (32 weights, 18 bytes: fp16 d, 16 bytes of nibbles): w = (q - 8) d -> 4-bit, group 32, symmetric.
- Q4_1 (32 weights, 20 bytes: fp16 d, fp16 m, nibbles): w = q d + m -> 4-bit, group 32, zero -m / d.
- Q8_0 (32 weights, 34 bytes: fp16 d, 32 int8): w = q d -> codes q + 128, 8-bit, group 32, symmetric.
- Q4_K (256 weights, 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc and mins m for 8 sub-blocks of
  32, 128 bytes of nibbles): w = d sc q - dmin m -> 4-bit, group 32, scale d sc, zero dmin m / (d sc).
- Q5_K (256 weights, 176 bytes: as Q4_K plus 32 bytes holding each weight's fifth bit): 5-bit codes stored in
  the 8-bit layout, group 32, same scale and zero as Q4_K.
- Q6_K (256 weights, 210 bytes: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d):
  w = d sc (q - 32) for 16 sub-blocks of 16 -> codes q + 96 in the 8-bit layout, group 16, symmetric (zero 128).

Q4_0/Q4_1/Q8_0 scales stay fp16 (the file's values); K-quant scales d * sc are fp32, where the product of an
fp16 and a 6/8-bit integer is exact (fp16 would round it). Zeros are fp32. A group whose scale is 0 holds the
constant -dmin m (or m for Q4_1): scale = that constant, zero -1, codes 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

SUPER_BLOCK = 256  # weights per K-quant block


@dataclass(frozen=True)
class BlockType:
    """How one GGUF type lands in the kernel layout."""

    bits: int  # code width in the kernel layout (4 or 8)
    group_size: int  # input channels per (scale, zero) group after repacking
    block_bytes: int  # bytes per GGUF block
    block_weights: int  # weights per GGUF block (32, or 256 for K-quants)
    has_zeros: bool  # float zero points (False: symmetric, zero 2^(bits-1))
    scale_dtype: torch.dtype


def _fp16(columns: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] float32 (the block's fp16 field)."""
    return np.ascontiguousarray(columns).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray, runs: int) -> np.ndarray:
    """[..., runs * n] bytes -> [..., runs * 2 * n] codes: each run of n bytes gives its n low nibbles, then its
    n high nibbles (the element order of Q4_0/Q4_1 blocks and of the K-quants' 32-byte runs)."""
    split = packed.reshape(*packed.shape[:-1], runs, 1, -1)
    both = np.concatenate([split & 0x0F, split >> 4], axis=-2)
    return both.reshape(*packed.shape[:-1], -1)


def _affine(scale: np.ndarray, offset: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, ...]:
    """w = scale * q - offset per group -> (codes, scale, zero) with zero = offset / scale; a group with scale 0
    holds the constant -offset, stored as scale -offset, zero -1, codes 0."""
    constant = scale == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.where(constant, -1.0, offset / scale).astype(np.float32)
    scale = np.where(constant, -offset, scale).astype(np.float32)
    codes = np.where(constant[..., None], 0, codes).astype(np.uint8)
    return codes, scale, zero


def _q4_0(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    return _nibbles(blocks[..., 2:], 1), _fp16(blocks[..., :2]), None


def _q4_1(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    return _affine(_fp16(blocks[..., :2]), -_fp16(blocks[..., 2:4]), _nibbles(blocks[..., 4:], 1))


def _q8_0(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes, _fp16(blocks[..., :2]), None


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of a Q4_K / Q5_K block -> 6-bit scales and mins [..., 8]. Bytes 0-3 hold scales 0-3 in
    their low 6 bits, bytes 4-7 mins 0-3; sub-blocks 4-7 take their low 4 bits from bytes 8-11 (scale: low
    nibble, min: high nibble) and their top 2 bits from the spare top bits of bytes 0-3 (scale) / 4-7 (min)."""
    low_sc, low_min, extra = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    high_sc = (extra & 0x0F) | ((low_sc >> 6) << 4)
    high_min = (extra >> 4) | ((low_min >> 6) << 4)
    return (np.concatenate([low_sc & 0x3F, high_sc], axis=-1).astype(np.float32),
            np.concatenate([low_min & 0x3F, high_min], axis=-1).astype(np.float32))


def _k_affine(blocks: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q4_K / Q5_K: per sub-block scale d sc and offset dmin m, codes [..., 8, 32]."""
    d, dmin = _fp16(blocks[..., 0:2])[..., None], _fp16(blocks[..., 2:4])[..., None]
    sc, mins = _k_scales_mins(blocks[..., 4:16])
    codes, scale, zero = _affine(d * sc, dmin * mins, codes)
    return codes.reshape(*codes.shape[:-2], -1), scale, zero


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    codes = _nibbles(blocks[..., 16:], 4)  # 4 runs of 32 bytes -> sub-blocks 2r (low) and 2r + 1 (high)
    return _k_affine(blocks, codes.reshape(*codes.shape[:-1], 8, 32))


def _q5_k(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    low = _nibbles(blocks[..., 48:], 4).reshape(*blocks.shape[:-1], 8, 32)
    # Byte i of the 32 high-bit bytes holds bit 4 of element i of sub-block s at bit s.
    high = (blocks[..., 16:48, None] >> np.arange(8, dtype=np.uint8)) & 1  # [..., 32 elements, 8 sub-blocks]
    return _k_affine(blocks, low | (np.swapaxes(high, -1, -2) << 4))


def _q6_k(blocks: np.ndarray) -> tuple[np.ndarray, ...]:
    lead = blocks.shape[:-1]
    # Each half of 128 weights: 64 low-nibble bytes as 2 runs of 32 (elements 0-31 and 32-63 from the low
    # nibbles, 64-95 and 96-127 from the high ones), and 32 bytes giving quarter t its top 2 bits at bits 2t.
    low = blocks[..., :128].reshape(*lead, 2, 1, 2, 32)
    low = np.concatenate([low & 0x0F, low >> 4], axis=-3).reshape(*lead, 2, 4, 32)
    high = (blocks[..., 128:192].reshape(*lead, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
    q = (low | (high << 4)).reshape(*lead, 256)
    scale = _fp16(blocks[..., 208:210])[..., None] * blocks[..., 192:208].view(np.int8).astype(np.float32)
    return (q + 96).astype(np.uint8), scale, None


PACKED_TYPES: dict[str, BlockType] = {
    "Q4_0": BlockType(4, 32, 18, 32, False, torch.float16),
    "Q4_1": BlockType(4, 32, 20, 32, True, torch.float16),
    "Q8_0": BlockType(8, 32, 34, 32, False, torch.float16),
    "Q4_K": BlockType(4, 32, 144, SUPER_BLOCK, True, torch.float32),
    "Q5_K": BlockType(8, 32, 176, SUPER_BLOCK, True, torch.float32),
    "Q6_K": BlockType(8, 16, 210, SUPER_BLOCK, False, torch.float32),
}
_DECODERS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, ...]]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def gguf_block_codes(raw: np.ndarray, type_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A GGUF tensor's bytes [rows, blocks * block bytes] -> codes uint8 [rows, cols], scales [rows, groups]
    (the type's ``scale_dtype``), zeros fp32 [rows, groups] (None: symmetric) with w = (code - zero) * scale."""
    kind = PACKED_TYPES[type_name]
    rows = raw.shape[0]
    codes, scale, zero = _DECODERS[type_name](raw.reshape(rows, -1, kind.block_bytes))
    codes_t = torch.from_numpy(np.ascontiguousarray(codes.reshape(rows, -1)))
    scale_t = torch.from_numpy(np.ascontiguousarray(scale.reshape(rows, -1), dtype=np.float32)).to(kind.scale_dtype)
    zero_t = None if zero is None else torch.from_numpy(np.ascontiguousarray(zero.reshape(rows, -1)))
    return codes_t, scale_t, zero_t
