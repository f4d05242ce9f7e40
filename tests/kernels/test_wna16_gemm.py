"""W4A16 / W8A16 linears (CPU slab path and the Triton kernel) against the fp32 dequantized reference on fresh
random packed weights, scales and zero points, every bit width and group size the loaders accept."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, requires_triton_device

from tokenmill.kernels import wna16_gemm
from tokenmill.kernels.wna16_gemm import (
    PackedWeight,
    WNA16Config,
    default_config,
    dequantize,
    wna16_linear,
    wna16_linear_cpu,
    wna16_linear_reference,
)


def random_packed(k: int, n: int, bits: int, group: int, zeros: bool, dtype, device, seed: int) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // (32 // bits), n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.005).to(dtype)
    zero = (torch.rand(k // group, n, generator=gen) * (2**bits - 1)).round().to(dtype) if zeros else None
    return PackedWeight(qweight.to(device), scales.to(device), None if zero is None else zero.to(device), bits, group)


def test_dequantize_matches_codes_by_hand():
    codes = torch.arange(16, dtype=torch.int64).repeat(2)[:, None]  # K = 32 codes 0..15, 0..15; N = 1
    word = lambda c: sum(int(v) << (4 * j) for j, v in enumerate(c))  # noqa: E731
    words = [word(codes[i : i + 8, 0]) for i in range(0, 32, 8)]
    qweight = torch.tensor([[w - (1 << 32) if w >= 1 << 31 else w] for w in words], dtype=torch.int32)
    packed = PackedWeight(qweight, torch.tensor([[0.5], [2.0]]), None, 4, 16)
    want = torch.cat([(torch.arange(16.0) - 8) * 0.5, (torch.arange(16.0) - 8) * 2.0])
    assert torch.equal(dequantize(packed)[:, 0], want)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
def test_cpu_path_matches_reference_in_small_slabs(monkeypatch, bits, zeros):
    monkeypatch.setattr(wna16_gemm, "CPU_SLAB_ELEMENTS", 256 * 24)  # force several slabs
    packed = random_packed(256, 200, bits, 64, zeros, torch.float32, "cpu", seed=bits)
    x = torch.randn(3, 5, 256)
    bias = torch.randn(200)
    out = wna16_linear_cpu(x, packed, bias)
    ref = x.reshape(15, 256) @ dequantize(packed) + bias
    assert out.shape == (3, 5, 200)
    assert rel_err(out.reshape(15, 200), ref) < 1e-5


def test_default_config_splits_k_for_few_output_tiles_only():
    assert default_config(1, 4096, 4096, 128).split_k > 1
    assert default_config(2048, 4096, 4096, 128).split_k == 1
    assert default_config(1, 4096, 4096, 32).block_k == 32


@requires_triton_device
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,group,zeros", [(4, 128, False), (4, 32, True), (8, 64, False), (4, 256, True),
                                              (8, 16, False), (8, 32, True)])  # GGUF Q6_K, Q5_K
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_triton_kernel_matches_fp32_reference(device, dtype, bits, group, zeros, rows):
    k, n = 512, 192
    packed = random_packed(k, n, bits, group, zeros, dtype, device, seed=rows + bits + group)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    ref = wna16_linear_reference(x.float(), packed, bias).float()  # fp32 activations: the true product
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    configs = [None, WNA16Config(16, 32, 32, 1), WNA16Config(16, 64, 64, 4), WNA16Config(32, 64, 32, 2)]
    for config in configs:
        out = wna16_linear(x, packed, bias, config)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert rel_err(out, ref) < tol, config


@requires_triton_device
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("bits,group,zeros", [(4, 128, False), (4, 32, True), (8, 64, False), (4, 512, True),
                                              (8, 16, False), (8, 32, True)])  # GGUF Q6_K, Q5_K
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_triton_gemv_matches_fp32_reference(device, dtype, bits, group, zeros, rows):
    """The few-row GEMV kernel (one load per packed word, no MMA padding), split over K or not."""
    k, n = 512, 192
    packed = random_packed(k, n, bits, group, zeros, dtype, device, seed=rows + bits + group + 1)
    gen = torch.Generator().manual_seed(rows + 100)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    ref = wna16_linear_reference(x.float(), packed, bias).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for config in (WNA16Config(block_n=64, block_k=128, gemv=True), WNA16Config(block_n=32, block_k=64, split_k=4,
                                                                                gemv=True, num_warps=8)):
        out = wna16_linear(x, packed, bias, config)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert rel_err(out, ref) < tol, config
    with pytest.raises(ValueError, match="at most 8 rows"):
        wna16_linear(torch.zeros(9, k, dtype=dtype, device=device), packed, None, WNA16Config(gemv=True))
