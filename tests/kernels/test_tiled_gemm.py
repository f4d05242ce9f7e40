"""The decode linear kernels (tiled GEMM, GEMV) against an fp32 reference on fresh random inputs (bf16 and
fp16, every config)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, requires_cuda

from tokenmill.kernels.decode_linear import candidates_for as decode_candidates_for
from tokenmill.kernels.decode_linear import decode_linear
from tokenmill.kernels.tiled_gemm import (
    SKINNY_CANDIDATES,
    WIDE_CANDIDATES,
    tiled_linear,
    tiled_linear_reference,
)

pytestmark = requires_cuda
TOL = 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16, 17, 64, 200, 256])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 1024), (6144, 4000)], ids=["square", "ragged_n", "ragged_k"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_every_decode_linear_config_matches_fp32_reference(dtype, rows, shape, bias):
    """Every config the tuner may pick at ``rows``: the GEMV's (1-2 rows) and the tiled GEMM's."""
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None
    ref = tiled_linear_reference(x, weight, b).float()
    for config in decode_candidates_for(rows):
        out = decode_linear(x, weight, b, config)
        assert out.shape == (rows, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL, config


def test_every_config_handles_row_counts_outside_its_regime():
    """A skinny config over many rows and a wide config over one row still compute the product."""
    gen = torch.Generator(device="cuda").manual_seed(7)
    weight = (torch.randn(512, 768, device="cuda", generator=gen) * 768**-0.5).to(torch.bfloat16)
    for rows, configs in [(100, SKINNY_CANDIDATES), (1, WIDE_CANDIDATES)]:
        x = torch.randn(rows, 768, device="cuda", generator=gen).to(torch.bfloat16)
        ref = tiled_linear_reference(x, weight).float()
        for config in configs:
            assert rel_err(tiled_linear(x, weight, None, config), ref) < TOL, config


def test_tiled_linear_rejects_what_it_cannot_do():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16/fp16"):
        tiled_linear(x.float(), weight.float())
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        tiled_linear(x[:, :32], weight)
    with pytest.raises(ValueError, match="contiguous"):
        tiled_linear(x, torch.randn(64, 32, device="cuda", dtype=torch.bfloat16).t())
