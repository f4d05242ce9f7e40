"""PyTorch's CPU weight-only kernels (int4 groups, int8 per row) behind ``PackedWeight``: equal to the fp32
dequantized reference on fresh random codes, zero points and act-order-free groups; formats no kernel takes
(8-bit groups, 4-bit groups of 16) keep the slab-wise dequantize path. A Q8_0 table (8-bit codes, groups of 32)
through the int4 kernel as two 4-bit halves."""

from __future__ import annotations

import pytest
import torch

from tokenmill.kernels.wna16_cpu import (
    cpu_kernels_available,
    cpu_linear,
    prepare_cpu,
    prepare_q8_blocks,
    q8_blocks,
)
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


def _q8_0_table(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A table as a Q8_0 file dequantizes: fp16 block scales times int8 codes reaching +-127 in every block."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k // 32, 32), generator=gen)
    codes[..., 0] = 127 * (torch.randint(0, 2, (n, k // 32), generator=gen) * 2 - 1)
    scales = (torch.rand(n, k // 32, generator=gen) * 0.02 + 1e-3).half().float()
    return (codes * scales[..., None]).view(n, k).float(), codes.view(n, k), scales


def test_q8_blocks_recovers_a_q8_0_tables_codes_exactly_and_refuses_other_tables():
    table, codes, scales = _q8_0_table(64, 96, seed=3)
    found = q8_blocks(table)
    assert found is not None and torch.equal(found[0].long(), codes) and torch.equal(found[1], scales)
    assert q8_blocks(torch.randn(64, 96, generator=torch.Generator().manual_seed(4))) is None
    assert q8_blocks(table.bfloat16()) is None  # only the exact fp32 values


def test_q8_blocks_through_the_int4_kernel_match_the_fp32_table():
    """Each 8-bit code split into two 4-bit halves along a doubled K: one int4 call equals x . table^T."""
    table, codes, scales = _q8_0_table(128, 192, seed=5)
    weight = prepare_q8_blocks(*q8_blocks(table))
    assert weight is not None and weight.kind == "q8_blocks"
    x = torch.randn(1, 192, generator=torch.Generator().manual_seed(6))
    ref = x.double() @ table.double().t()
    out = cpu_linear(x.bfloat16(), weight)
    assert out.dtype == torch.bfloat16 and ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
