"""Decoder building blocks: RMSNorm, rotary embedding (plain / linear / llama3), SwiGLU. Linears: model/linear.py.

The hot functions (``rms_norm``, ``apply_rotary``, ``silu_and_mul``) are plain functions so the GPU team can
swap in fused Triton kernels; every parameter carries a ``weight_loader`` so layers own their weight loading.
A norm or activation is told which linear it ``feeds``; when that linear's method takes per-token FP8 input
(``accepts_fp8_tokens``: W8A8 with dynamic scales at this row count), it gets ``Fp8Tokens`` made in the same pass.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.kernels import ops as fused
from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.fp8_quant import Fp8Tokens, quantize_fp8

if TYPE_CHECKING:
    from tokenmill.model.linear import LinearBase


def _fused(x: torch.Tensor) -> bool:
    """Fused Triton kernels on CUDA tensors; the plain torch code below is the reference elsewhere."""
    return HAS_TRITON and x.is_cuda


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Copy a checkpoint tensor into a parameter of the same shape (casting dtype and device)."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}; parameter expects {tuple(param.shape)}")
    param.data.copy_(loaded)


def _wants_fp8(feeds: LinearBase | None, x: torch.Tensor) -> bool:
    """Whether the linear this output feeds takes it quantized per token (its method decides, by x's rows)."""
    return feeds is not None and x.dim() == 2 and feeds.accepts_fp8_tokens(x)


def _per_token_fp8(out: torch.Tensor) -> Fp8Tokens:
    """The unfused pair's second half (CPU: the reference composition, the same ops as the linear's own)."""
    return Fp8Tokens(*quantize_fp8(out, dim=-1), out.dtype)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None, fp8_out: bool = False
) -> tuple[torch.Tensor | Fp8Tokens, torch.Tensor]:
    """(norm(x + residual), x + residual); with no residual, (norm(x), x). Variance in fp32 like HF. ``fp8_out``
    (x [T, H]): the norm as ``Fp8Tokens``."""
    if _fused(x):
        if fp8_out:
            return fused.rms_norm_fp8(x, weight, eps, residual)
        if residual is None:
            return fused.rms_norm(x.contiguous(), weight, eps), x
        return fused.rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = x + residual
    # F.rms_norm is x * rsqrt(mean(x^2) + eps) in fp32, the statement HF writes out, in one call (fewer
    # Python-level ops: a CPU decode step runs 61 of these on 576-wide rows)
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    out = weight * normed
    return (_per_token_fp8(out) if fp8_out else out), x


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size))
        self.weight.weight_loader = default_weight_loader

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, feeds: LinearBase | None = None
    ) -> tuple[torch.Tensor | Fp8Tokens, torch.Tensor]:
        """``feeds``: the linear that consumes the output (it may take it as ``Fp8Tokens``)."""
        return rms_norm(x, self.weight, self.eps, residual, _wants_fp8(feeds, x))


def silu_and_mul(x: torch.Tensor, feeds: LinearBase | None = None) -> torch.Tensor | Fp8Tokens:
    """SwiGLU on a fused [.., 2 * d] gate|up projection: silu(gate) * up; as ``Fp8Tokens`` where ``feeds`` (the
    down projection) takes them."""
    fp8_out = _wants_fp8(feeds, x)
    if _fused(x):
        return fused.silu_and_mul_fp8(x) if fp8_out else fused.silu_and_mul(x)
    d = x.shape[-1] // 2
    out = F.silu(x[..., :d]) * x[..., d:]
    return _per_token_fp8(out) if fp8_out else out


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with linear or Llama-3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and a smooth blend in between.
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = original / low
    high_freq_wavelen = original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def rope_cos_sin_cache(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int
) -> torch.Tensor:
    """[max_positions, head_dim] fp32: cos of each position's angles in the first half, sin in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (rotate-half) rope on q [T, Hq, D] and k [T, Hkv, D] at ``positions`` [T]."""
    if _fused(q):  # in place on the (strided) q/k views of the fused qkv output
        return fused.apply_rotary(q, k, positions, cos_sin_cache)
    cos, sin = rotary_tables(cos_sin_cache, positions, q.dtype)
    return rotate_half(q, cos, sin), rotate_half(k, cos, sin)


def rotary_tables(cos_sin_cache: torch.Tensor, positions: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [T, 1, D] and the signed sin [T, 1, D] (-sin on the first half) for ``rotate_half``, in ``dtype``."""
    cos, sin = cos_sin_cache.index_select(0, positions).to(dtype).chunk(2, dim=-1)
    return torch.cat([cos, cos], dim=-1)[:, None], torch.cat([-sin, sin], dim=-1)[:, None]


def rotate_half(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """[x1 cos - x2 sin, x2 cos + x1 sin] on the halves of x [T, H, D], in three elementwise ops. Rounded as the
    halves' formula is in low precision: x2 * (-sin) is -(x2 * sin) exactly, and a + (-b) is a - b."""
    # the halves swapped, [x2, x1], as one roll by half the head: one op instead of a chunk and a cat (~7 us
    # less a call on the 2-core CPU box, where a SmolLM2 decode step makes 30 of these calls)
    return (x * cos).add_(torch.roll(x, x.shape[-1] // 2, dims=-1) * signed_sin)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table (fp32, not saved in checkpoints) and applies it."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int) -> None:
        super().__init__()
        cache = rope_cos_sin_cache(head_dim, theta, scaling, max_positions)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._tables: tuple[torch.Tensor, torch.dtype, torch.Tensor, torch.Tensor] | None = None  # CPU, see forward

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _fused(q) or positions.device.type != "cpu":
            return apply_rotary(q, k, positions, self.cos_sin_cache)
        # CPU: every layer of a forward pass rotates at the same positions; the tables are made by the first
        # layer and reused while the positions (compared by value: one small equal) and the dtype are the same.
        held = self._tables
        if held is None or held[1] != q.dtype or held[0].shape != positions.shape or not torch.equal(held[0], positions):
            held = self._tables = (positions.clone(), q.dtype, *rotary_tables(self.cos_sin_cache, positions, q.dtype))
        cos, sin = held[2], held[3]
        joint = _adjacent_heads(q, k)
        if joint is not None:  # q and k side by side in the fused qkv output: one rotation for both
            out = rotate_half(joint, cos, sin)
            return out[:, : q.shape[1]], out[:, q.shape[1] :]
        return rotate_half(q, cos, sin), rotate_half(k, cos, sin)


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q [T, Hq, D] and k [T, Hkv, D] as one [T, Hq + Hkv, D] view when k's heads follow q's in memory (the q and k
    slices of one qkv projection), else None."""
    same_layout = (q.dtype == k.dtype and q.shape[0] == k.shape[0] and q.shape[2] == k.shape[2]
                   and q.stride() == k.stride() and q.stride(2) == 1 and q.stride(1) == q.shape[2])
    if not same_layout or q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr():
        return None
    if k.storage_offset() != q.storage_offset() + q.shape[1] * q.shape[2]:
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())
