"""Weight-only int4 / int8 matmul on CPUs through PyTorch's own kernels, for a ``PackedWeight`` (wna16_gemm.py).

- 4-bit, groups of 32/64/128/256: ``torch._weight_int4pack_mm_for_cpu`` (the kernel torchao's int4 weight-only
  path uses on CPU); its weight is w = (q - 8) * scale + offset per group, so our (q - zero) * scale becomes
  offset = (8 - zero) * scale (zero 8 when symmetric).
- 8-bit, symmetric, one group per row: ``torch._weight_int8pack_mm`` (w = int8 value * per-row scale).
- 8-bit codes in groups of 32 with one scale each (GGUF's Q8_0, e.g. a tied token embedding used as the LM
  head): ``prepare_q8_blocks`` splits each code q in [-128, 127] into q = 16 * hi + lo (hi in [-8, 7], lo in
  [0, 15]) and lays both halves side by side along K as one int4 weight of width 2K (hi with scale 16 d, lo with
  scale d and offset 8 d), so one ``_weight_int4pack_mm_for_cpu`` call on [x, x] computes x . (q d) with the
  file's codes, at half the bytes of a bf16 table (one core-pair here: 2.4-2.7 ms for 49152 x 576 at 1 row
  against 3.5 ms dense bf16). The kernel's cost grows with the rows (a GEMV per row), so it serves 1 row.
Anything else (8-bit groups, other group sizes) returns None from ``prepare_cpu`` and keeps the slab-wise
dequantize path (``wna16_linear_cpu``). The copy is made on a layer's first bf16 call and held beside the
packed weight (0.5 byte per weight more for int4). The kernels are fast for bf16 activations only: on one core of this
box (AVX-512 + AMX), a 960x576 group-32 int4 matmul takes 0.044 ms at 1 row in bf16 (dense fp32: 0.075 ms) but
1.1 ms in fp32 and 52 ms at 16 rows in fp32, so the linear methods call them for bf16 inputs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.kernels.wna16_gemm import PackedWeight, unpack_codes

INT4_GROUPS = (32, 64, 128, 256)


@dataclass
class CPUWeight:
    """The weight in the layout of one of PyTorch's CPU weight-only kernels."""

    kind: str  # "int4" | "int8" | "q8_blocks" (int4 of width 2K: see the module docstring)
    weight: torch.Tensor  # int4: uint8 [N, K / 2] (the kernel's packing); int8: int8 [N, K]
    group_size: int
    scales: torch.Tensor  # int4: fp32 [K / group, N] scale; int8: fp32 [N]
    offsets: torch.Tensor | None  # int4: fp32 [K / group, N] added per group
    by_dtype: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)  # scales in x's dtype

    def scales_for(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self.by_dtype:
            if self.kind != "int8":
                self.by_dtype[dtype] = torch.stack([self.scales, self.offsets], dim=-1).to(dtype).contiguous()
            else:
                self.by_dtype[dtype] = self.scales.to(dtype)
        return self.by_dtype[dtype]


def cpu_kernels_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_weight_int8pack_mm")


def prepare_cpu(packed: PackedWeight) -> CPUWeight | None:
    """Repack for a PyTorch CPU kernel, or None when no kernel takes this format (see the module docstring)."""
    if not isinstance(packed, PackedWeight) or packed.qweight.device.type != "cpu" or not cpu_kernels_available():
        return None  # (a K-major repack is a CUDA layout: quantization/weight_layout.py)
    k, n = packed.in_features, packed.out_features
    codes = unpack_codes(packed.qweight, packed.bits)  # [K, N]
    scales = packed.scales.float()
    if packed.bits == 4 and packed.group_size in INT4_GROUPS and k % packed.group_size == 0 and n % 8 == 0:
        zeros = torch.full_like(scales, 8.0) if packed.zeros is None else packed.zeros.float()
        weight = torch._convert_weight_to_int4pack_for_cpu(codes.t().contiguous(), 1)
        return CPUWeight("int4", weight, packed.group_size, scales.contiguous(), ((8.0 - zeros) * scales).contiguous())
    if packed.bits == 8 and packed.zeros is None and packed.group_size == k:
        weight = (codes.t() - 128).to(torch.int8).contiguous()
        return CPUWeight("int8", weight, k, scales[0].contiguous(), None)
    return None


def q8_blocks(weight: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Codes (int8 [N, K]) and per-group scales (fp32 [N, K / group]) that reproduce ``weight`` exactly (fp32, as
    a Q8_0 table dequantizes: d * q with |q| reaching 127 in every non-zero block); None when they do not."""
    n, k = weight.shape
    if weight.dtype != torch.float32 or k % group:
        return None
    blocks = weight.view(n, k // group, group)
    scales = blocks.abs().amax(-1) / 127
    codes = torch.round(blocks / scales.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
    if codes.abs().max() > 127 or not torch.equal(codes * scales[..., None], blocks):
        return None
    return codes.to(torch.int8).view(n, k), scales


def prepare_q8_blocks(codes: torch.Tensor, scales: torch.Tensor, group: int = 32) -> CPUWeight | None:
    """8-bit group codes (int8 [N, K], scales [N, K / group]) as one int4 weight of width 2K (module docstring)."""
    if not cpu_kernels_available() or group not in INT4_GROUPS or codes.shape[0] % 8:
        return None
    wide = codes.int()
    lo = wide & 15  # two's complement: q = 16 * (q >> 4) + (q & 15)
    hi = (wide - lo) // 16
    weight = torch._convert_weight_to_int4pack_for_cpu(torch.cat([hi + 8, lo], dim=1).contiguous(), 1)
    d = scales.float().t()  # [K / group, N]
    kernel_scales = torch.cat([16 * d, d]).contiguous()
    offsets = torch.cat([torch.zeros_like(d), 8 * d]).contiguous()
    return CPUWeight("q8_blocks", weight, group, kernel_scales, offsets)


def cpu_weight(layer: torch.nn.Module) -> CPUWeight | None:
    """The layer's ``wna16`` in a CPU kernel's layout, repacked on the first call that needs it (so fp32 models,
    which do not use the kernels, never hold the copy); None when no kernel takes the format."""
    if "wna16_cpu" not in layer.__dict__:
        layer.wna16_cpu = prepare_cpu(layer.wna16)
    return layer.wna16_cpu


def cpu_linear(x: torch.Tensor, weight: CPUWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] times the weight (+ bias) -> [M, N] in x's dtype."""
    if weight.kind != "int8":
        x = torch.cat([x, x], dim=-1) if weight.kind == "q8_blocks" else x.contiguous()
        out = torch._weight_int4pack_mm_for_cpu(x, weight.weight, weight.group_size, weight.scales_for(x.dtype))
    else:
        out = torch._weight_int8pack_mm(x.contiguous(), weight.weight, weight.scales_for(x.dtype))
    if bias is not None:
        out += bias.to(x.dtype)
    return out
