"""Group-wise integer codes and the two checkpoint layouts that vLLM and transformers read.

A quantized weight W [out, in] is integer codes q [out, in] in [0, 2^bits), one scale and one zero point per
(group of ``group_size`` input channels, output channel), and W ~= (q - zero) * scale.

- GPTQ (AutoGPTQ / GPTQModel "gptq" checkpoint format): ``qweight`` int32 [in / (32/bits), out] packs input
  channels (value j of a word at bits j*bits), ``qzeros`` int32 [groups, out / (32/bits)] packs output channels
  and stores zero - 1 (the format's historical offset), ``scales`` fp16 [groups, out], ``g_idx`` int32 [in]
  gives each input channel's group (act-order permutes it).
- AWQ (AutoAWQ "gemm" version): ``qweight`` int32 [in, out / 8] packs output channels in the interleaved order
  0 2 4 6 1 3 5 7, ``qzeros`` int32 [groups, out / 8] the same way, ``scales`` fp16 [groups, out]; 4-bit only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Output channel held by nibble i of an AWQ word, and its inverse (nibble of output channel j).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
SUPPORTED_BITS = (4, 8)


@dataclass
class QuantizedWeight:
    """Codes [out, in] (int32, values in [0, 2^bits)), scales and zeros [groups, out] in natural channel order,
    and g_idx [in] (group of each input channel)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    def dequantize(self) -> torch.Tensor:
        """W [out, in] in fp32: (q - zero) * scale with each input channel's group."""
        scales = self.scales.float()[self.g_idx.long()].t()  # [out, in]
        zeros = self.zeros.float()[self.g_idx.long()].t()
        return (self.codes.float() - zeros) * scales


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported; supported: {', '.join(map(str, SUPPORTED_BITS))}")


def resolve_group_size(group_size: int, in_features: int) -> int:
    """-1 means one group over all input channels; otherwise the size must divide the input width."""
    if group_size == -1:
        return in_features
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the input width {in_features}; use a divisor or -1"
        )
    return group_size


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero per row of ``w`` [rows, cols] (min/max over the columns), GPTQ's rule:
    asymmetric spans [min, max] with 2^bits - 1 steps; symmetric spans [-absmax, absmax] around 2^(bits-1)."""
    maxq = 2**bits - 1
    w = w.float()
    wmin = w.amin(dim=1).clamp(max=0.0)
    wmax = w.amax(dim=1).clamp(min=0.0)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    span = wmax - wmin
    span = torch.where(span > 0, span, torch.ones_like(span))  # an all-zero row: any scale is exact
    # A tensor divisor: CUDA turns division by a Python scalar into a multiply by its reciprocal, one ulp off
    # CPU's quotient; the symmetric grid puts each group's extreme weight on a rounding tie (+-(maxq + 1) / 2),
    # so that ulp would flip its code and a GPU and a CPU load would hold different weights.
    scale = span / torch.full_like(span, maxq)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) / 2)
    else:
        zero = torch.round(-wmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` [rows, cols] with per-row ``scale``/``zero`` [rows] (broadcast over the columns)."""
    q = torch.round(w.float() / scale[:, None]) + zero[:, None]
    return q.clamp(0, 2**bits - 1)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> QuantizedWeight:
    """Round-to-nearest, group-wise over input channels: the baseline GPTQ and AWQ must beat."""
    check_bits(bits)
    out_features, in_features = weight.shape
    group_size = resolve_group_size(group_size, in_features)
    groups = in_features // group_size
    grouped = weight.float().reshape(out_features, groups, group_size).transpose(0, 1)  # [groups, out, gs]
    scale, zero = group_params(grouped.reshape(-1, group_size), bits, sym)
    codes = quantize_codes(grouped.reshape(-1, group_size), scale, zero, bits)
    codes = codes.reshape(groups, out_features, group_size).transpose(0, 1).reshape(out_features, in_features)
    g_idx = torch.arange(in_features, dtype=torch.int32) // group_size
    return QuantizedWeight(
        codes=codes.to(torch.int32),
        scales=scale.reshape(groups, out_features),
        zeros=zero.reshape(groups, out_features),
        g_idx=g_idx,
        bits=bits,
    )


def pack_along(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide ints along ``dim`` into int32 words, value j of a word at bits j*bits."""
    per_word = 32 // bits
    values = values.to(torch.int64).movedim(dim, -1)
    if values.shape[-1] % per_word:
        raise ValueError(f"dimension of size {values.shape[-1]} is not a multiple of {per_word} ({bits}-bit packing)")
    values = values.reshape(*values.shape[:-1], -1, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64, device=values.device) * bits
    words = (values << shifts).sum(dim=-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement into int32's range
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_along(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Inverse of ``pack_along``: int32 words -> unsigned ints (int32), ``32 // bits`` per word along ``dim``."""
    per_word = 32 // bits
    words = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    values = (words[..., None] >> shifts) & (2**bits - 1)
    values = values.reshape(*values.shape[:-2], -1)
    return values.to(torch.int32).movedim(-1, dim).contiguous()


def to_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear (suffixes qweight, qzeros, scales, g_idx)."""
    return {
        "qweight": pack_along(qw.codes.t(), qw.bits, dim=0),
        # zero - 1 wraps for a zero of 0 (asymmetric only); readers add 1 back modulo 2^bits like from_gptq.
        "qzeros": pack_along((qw.zeros.to(torch.int64) - 1) & (2**qw.bits - 1), qw.bits, dim=1),
        "scales": qw.scales.to(torch.float16),
        "g_idx": qw.g_idx.to(torch.int32),
    }


def from_gptq(tensors: dict[str, torch.Tensor], bits: int) -> QuantizedWeight:
    codes = unpack_along(tensors["qweight"], bits, dim=0).t()
    # The stored zero is zero - 1; sym checkpoints of some writers store 0b1111... (-1 + 1 wraps to 0): mask.
    zeros = (unpack_along(tensors["qzeros"], bits, dim=1) + 1) & (2**bits - 1)
    return QuantizedWeight(codes, tensors["scales"].float(), zeros, tensors["g_idx"].to(torch.int32), bits)


def _awq_interleave(values: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Reorder each run of 8 output channels (last dim) by ``order``."""
    shape = values.shape
    index = torch.tensor(order, dtype=torch.long)
    return values.reshape(*shape[:-1], -1, 8)[..., index].reshape(shape)


def to_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The AWQ GEMM tensors of one linear (suffixes qweight, qzeros, scales); 4-bit, no act-order."""
    if qw.bits != 4:
        raise ValueError("the AWQ format stores 4-bit weights only; use --bits 4 or --method gptq")
    return {
        "qweight": pack_along(_awq_interleave(qw.codes.t(), AWQ_PACK_ORDER), 4, dim=1),
        "qzeros": pack_along(_awq_interleave(qw.zeros.to(torch.int64), AWQ_PACK_ORDER), 4, dim=1),
        "scales": qw.scales.to(torch.float16),
    }


def from_awq(tensors: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    codes = _awq_interleave(unpack_along(tensors["qweight"], 4, dim=1), AWQ_UNPACK_ORDER).t()
    zeros = _awq_interleave(unpack_along(tensors["qzeros"], 4, dim=1), AWQ_UNPACK_ORDER)
    in_features = codes.shape[1]
    g_idx = torch.arange(in_features, dtype=torch.int32) // resolve_group_size(group_size, in_features)
    return QuantizedWeight(codes.contiguous(), tensors["scales"].float(), zeros, g_idx, 4)
