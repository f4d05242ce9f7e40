"""The GEMV against an fp32 reference on fresh random inputs (bf16 and fp16, every config)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, requires_cuda

from tokenmill.kernels.decode_linear import candidates_for, decode_linear
from tokenmill.kernels.gemv import GEMV_CANDIDATES, GemvConfig, gemv
from tokenmill.kernels.tiled_gemm import SKINNY_CANDIDATES, tiled_linear, tiled_linear_reference

pytestmark = requires_cuda
TOL = 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 1024), (6144, 4000)], ids=["square", "ragged_n", "ragged_k"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gemv_matches_fp32_reference(dtype, rows, shape, bias):
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None
    ref = tiled_linear_reference(x, weight, b).float()
    for config in GEMV_CANDIDATES:
        out = gemv(x, weight, b, config)
        assert out.shape == (rows, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL, config


def test_candidates_offer_the_gemv_only_where_it_applies():
    assert set(candidates_for(1)) >= set(GEMV_CANDIDATES) and set(candidates_for(2)) >= set(GEMV_CANDIDATES)
    assert not any(isinstance(c, GemvConfig) for c in candidates_for(4))


def test_gemv_rejects_what_it_cannot_do():
    weight = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 2 rows"):
        gemv(torch.randn(3, 64, device="cuda", dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        gemv(torch.randn(1, 128, device="cuda", dtype=torch.bfloat16), weight)
    with pytest.raises(ValueError, match="bf16/fp16"):
        gemv(torch.randn(1, 64, device="cuda"), weight.float())


def test_decode_linear_runs_the_kernel_its_config_names():
    gen = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(1, 512, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(256, 512, device="cuda", generator=gen) * 512**-0.5).to(torch.bfloat16)
    assert torch.equal(decode_linear(x, weight, None, GEMV_CANDIDATES[1]), gemv(x, weight, None, GEMV_CANDIDATES[1]))
    assert torch.equal(decode_linear(x, weight, None, SKINNY_CANDIDATES[0]), tiled_linear(x, weight, None, SKINNY_CANDIDATES[0]))
