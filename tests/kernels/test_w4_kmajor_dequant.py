"""The K-major layout's serving paths: the dequantize kernel (kernels/w4_kmajor_dequant.py) against the repack's
torch dequantization, and kernels/quant_dispatch.py's ``kmajor_cuda_linear`` at every row count it routes
differently (K-major GEMV, K-major tensor-core GEMM, dequantize + cuBLAS) against the fp32 product with the
dequantized weight, on fresh random codes, scales, zero points (integer and fractional), activations and bias;
measured-table entries naming each K-major kind, and entries naming a kernel of the other layout refused.
Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import rel_err, requires_triton_device
from test_wna16_gemm import random_packed

from tokenmill.kernels.quant_dispatch import (
    CONFIGS_ENV,
    KMAJOR_GEMM_MAX_ROWS,
    KMAJOR_GEMV_MAX_ROWS,
    default_kmajor_config,
    kmajor_cuda_linear,
    wna16_cuda_linear,
)
from tokenmill.kernels.w4_gemv import W4GemvConfig, dequantize_k_major, repack_k_major
from tokenmill.kernels.w4_kmajor_dequant import (
    KMajorDequantConfig,
    dequantize_k_major_dense,
    w4_kmajor_dequant_mm,
)
from tokenmill.kernels.w4_kmajor_gemm import KMajorGemmConfig
from tokenmill.kernels.wna16_gemm import wna16_linear_reference

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}  # output rounding: bf16 ~3e-3, fp16 ~3e-4 relative


def _weights(device, k, n, group, zeros, dtype, seed, fractional_zeros=False):
    packed = random_packed(k, n, 4, group, zeros, dtype, device, seed=seed)
    if fractional_zeros:  # AWQ / GPTQ-asym zero points are floats after load; the paths apply them in fp32
        gen = torch.Generator().manual_seed(seed + 2)
        packed = dataclasses.replace(packed, zeros=(torch.rand(packed.scales.shape, generator=gen) * 15).to(dtype)
                                     .to(device))
    return packed, repack_k_major(packed)


@requires_triton_device
@pytest.mark.parametrize("group,zeros,fractional,dtype,block_n,k_first", [
    (128, True, False, torch.bfloat16, 32, False), (32, False, False, torch.float16, 8, False),
    (256, True, True, torch.bfloat16, 16, False), (16, True, False, torch.float16, 64, False),
    (1024, False, False, torch.bfloat16, 4, False), (128, True, False, torch.bfloat16, 8, True),
    (1024, True, True, torch.float16, 8, True)])
def test_dequantize_kernel_equals_the_repack_dequantization(device, group, zeros, fractional, dtype, block_n,
                                                             k_first):
    """Every weight: fp32 out equals the torch dequantization bit for bit, x's dtype out is within one unit in the
    last place of it (the GPU rounds to nearest; Triton's interpreter truncates). 40 output channels (a partial
    channel tile at every block_n but 4 and 8), 3 groups; group 1024 spans several programs."""
    _, weight = _weights(device, 3 * group, 40, group, zeros, dtype, seed=group, fractional_zeros=fractional)
    want = dequantize_k_major(weight).t().cpu()  # [N, K] fp32
    config = KMajorDequantConfig(block_n=block_n, k_first=k_first)
    assert torch.equal(dequantize_k_major_dense(weight, torch.float32, config).cpu(), want)
    low = dequantize_k_major_dense(weight, dtype, config).cpu()
    assert low.dtype == dtype
    ulp = torch.finfo(dtype).eps  # relative spacing of the format's values
    assert ((low.float() - want).abs() <= ulp * want.abs()).all()


ROWS = [1, 2, 3, 4, 5, 8, 16, 17, 64, 100, KMAJOR_GEMM_MAX_ROWS + 1]


@requires_triton_device
@pytest.mark.parametrize("group,zeros,fractional,dtype", [(128, True, False, torch.bfloat16),
                                                          (64, False, False, torch.float16),
                                                          (32, True, True, torch.bfloat16)])
def test_every_row_count_matches_the_fp32_reference(device, group, zeros, fractional, dtype):
    """The default kernel for each row count (no table entry for these shapes), with bias; 72 channels."""
    k, n = 4 * group, 72
    packed, weight = _weights(device, k, n, group, zeros, dtype, seed=7 * group, fractional_zeros=fractional)
    gen = torch.Generator().manual_seed(group)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    kinds = set()
    for rows in ROWS:
        x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
        ref = wna16_linear_reference(x.float(), packed, bias.float()).float()
        out = kmajor_cuda_linear(x, weight, bias, {})
        assert out.dtype == dtype and out.shape == (rows, n)
        assert rel_err(out, ref) < TOL[dtype], rows
        kinds.add(type(default_kmajor_config(rows, n, k)).__name__)
    assert kinds == {"W4GemvConfig", "KMajorGemmConfig", "KMajorDequantConfig"}  # all three paths ran


def test_default_routing_by_row_count():
    def route(rows: int, n: int = 4096, k: int = 4096):
        return default_kmajor_config(rows, n, k)

    assert isinstance(route(1), W4GemvConfig) and isinstance(route(KMAJOR_GEMV_MAX_ROWS), W4GemvConfig)
    assert isinstance(route(KMAJOR_GEMV_MAX_ROWS + 1), KMajorGemmConfig)
    assert isinstance(route(KMAJOR_GEMM_MAX_ROWS), KMajorGemmConfig)
    assert isinstance(route(KMAJOR_GEMM_MAX_ROWS + 1), KMajorDequantConfig)
    # past 64 rows, K split until the SMs are filled: o_proj at 256 rows has 64 output tiles of 128 x 128
    assert route(256).split_k == 4 and route(256, n=28672).split_k == 1 and route(256, k=128).split_k == 1


@requires_triton_device
def test_a_measured_table_routes_k_major_weights_by_its_entries(device, tmp_path, monkeypatch):
    """Entries under format w4a16_g128_kmajor name each K-major kind; a K-major kind under the GPTQ layout's
    format, or a GPTQ-layout kernel under the K-major format, is a table error naming both."""
    k, n = 256, 40
    name = "cpu" if device == "cpu" else torch.cuda.get_device_name()
    entries = {"1": {"kernel": "w4_gemv", "kind": "kmajor", "block_n": 8, "groups": 1},
               "16": {"kernel": "w4_kmajor_gemm", "block_m": 16, "block_n": 32, "block_k": 64, "split_k": 2,
                      "x_runs": False},
               "512": {"kernel": "dequant_mm", "block_n": 8}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps({name: {"w4a16_g128_kmajor": {f"{n}x{k}": entries}}}))
    monkeypatch.setenv(CONFIGS_ENV, str(path))
    packed, weight = _weights(device, k, n, 128, True, torch.bfloat16, seed=3)
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 9, 300):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16).to(device)
        ref = wna16_linear_reference(x.float(), packed).float()
        assert rel_err(kmajor_cuda_linear(x, weight, None, {}), ref) < TOL[torch.bfloat16], rows
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({name: {"w4a16_g128": {f"{n}x{k}": {"4": entries["16"]}},
                                      "w4a16_g128_kmajor": {f"{n}x{k}": {"4": {"kernel": "wna16_gemm"}}}}}))
    monkeypatch.setenv(CONFIGS_ENV, str(bad))
    x = torch.randn(3, k, generator=gen).to(torch.bfloat16).to(device)
    with pytest.raises(ValueError, match="other weight layout"):
        wna16_cuda_linear(x, packed, None, {})
    with pytest.raises(ValueError, match="other weight layout"):
        kmajor_cuda_linear(x, weight, None, {})


@requires_triton_device
@pytest.mark.parametrize("chunk_n,zeros,bias", [(16, True, True), (32, False, False), (24, True, False),
                                                (64, True, True)])
def test_chunked_dequant_matches_the_fp32_reference(device, chunk_n, zeros, bias):
    """``chunk_n`` output channels at a time through one reused buffer, each product written into its slice of the
    output: 40 channels (a partial last chunk at 16, 24 and 32; one whole chunk at 64), with and without bias and
    zero points, equal to the fp32 product within output rounding and to the unchunked path's bits' rounding."""
    k, n, group = 256, 40, 64
    packed, weight = _weights(device, k, n, group, zeros, torch.bfloat16, seed=chunk_n)
    gen = torch.Generator().manual_seed(chunk_n + 1)
    b = torch.randn(n, generator=gen).to(torch.bfloat16).to(device) if bias else None
    config = KMajorDequantConfig(block_n=8, chunk_n=chunk_n)
    assert config.name == f"dequant_n8_w4_c{chunk_n}"
    for rows in (3, 17):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16).to(device)
        ref = wna16_linear_reference(x.float(), packed, None if b is None else b.float()).float()
        out = w4_kmajor_dequant_mm(x, weight, config, b)
        assert out.shape == (rows, n) and out.dtype == torch.bfloat16 and out.is_contiguous()
        assert rel_err(out, ref) < TOL[torch.bfloat16], rows
        whole = w4_kmajor_dequant_mm(x, weight, KMajorDequantConfig(block_n=8), b)
        assert rel_err(out, whole.float()) < TOL[torch.bfloat16], rows


@requires_triton_device
def test_dequantize_into_a_given_buffer(device):
    """``out`` is written in place (the chunked path's reused buffer); a buffer of the wrong shape, dtype or
    layout is refused by name."""
    _, weight = _weights(device, 256, 24, 128, True, torch.bfloat16, seed=11)
    buffer = torch.full((24, 256), float("nan"), dtype=torch.float32, device=device)
    got = dequantize_k_major_dense(weight, torch.float32, KMajorDequantConfig(block_n=8), out=buffer)
    assert got.data_ptr() == buffer.data_ptr()
    assert torch.equal(buffer.cpu(), dequantize_k_major(weight).t().cpu())
    for bad in (torch.empty(24, 128, device=device), torch.empty(24, 256, dtype=torch.bfloat16, device=device),
                torch.empty(256, 24, device=device).t()):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            dequantize_k_major_dense(weight, torch.float32, out=bad)


def test_dequant_config_checks_chunk_n():
    with pytest.raises(ValueError, match="chunk_n must be >= 0"):
        KMajorDequantConfig(chunk_n=-1)
    assert KMajorDequantConfig().name == "dequant_n32_w4"  # the unchunked default keeps its table name
    assert KMajorDequantConfig(64, 8, chunk_n=512, k_first=True).name == "dequant_n64_w8_c512_kf"
