"""PyTorch's CPU weight-only kernels (int4 groups, int8 per row) behind ``PackedWeight``: equal to the fp32
dequantized reference on fresh random codes, zero points and act-order-free groups; formats no kernel takes
(8-bit groups, 4-bit groups of 16) keep the slab-wise dequantize path."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.wna16_cpu import cpu_kernels_available, cpu_linear, prepare_cpu
from tokenmill.kernels.wna16_gemm import PackedWeight, wna16_linear_reference
from tokenmill.quantization.packing import pack_along

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="this torch has no CPU weight-only kernels")


def _random_packed(bits: int, group: int, zeros: bool, k: int = 256, n: int = 96, seed: int = 0) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)
    scales = torch.rand(k // group, n, generator=gen) * 0.01 + 1e-3
    zero = torch.randint(0, 2**bits, (k // group, n), generator=gen).float() if zeros else None
    return PackedWeight(pack_along(codes, bits, 0), scales, zero, bits, group)


@pytest.mark.parametrize("bits, group, zeros, kind", [
    (4, 32, True, "int4"), (4, 64, False, "int4"), (4, 128, True, "int4"), (4, 256, False, "int4"),
    (8, 256, False, "int8"),
])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cpu_kernel_matches_the_dequantized_reference(bits, group, zeros, kind, dtype, tol):
    packed = _random_packed(bits, group, zeros, seed=bits + group)
    weight = prepare_cpu(packed)
    assert weight is not None and weight.kind == kind
    x = torch.randn(5, packed.in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    bias = torch.randn(packed.out_features)
    out = cpu_linear(x, weight, bias)
    ref = wna16_linear_reference(x.float(), packed, bias)
    assert out.dtype == dtype and ((out.float() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("bits, group, zeros", [(8, 64, False), (8, 256, True), (4, 16, False)])
def test_formats_without_a_cpu_kernel_keep_the_dequantize_path(bits, group, zeros):
    assert prepare_cpu(_random_packed(bits, group, zeros)) is None
