"""The skinny decode GEMM against an fp32 reference on fresh random inputs (bf16 and fp16, every config)."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, requires_cuda

from tokenmill.kernels.skinny_gemm import CANDIDATES, MAX_ROWS, skinny_linear, skinny_linear_reference

pytestmark = requires_cuda
TOL = 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("rows", [1, 3, 8, MAX_ROWS])
@pytest.mark.parametrize("shape", [(4096, 4096), (1000, 1024), (6144, 4000)], ids=["square", "ragged_n", "ragged_k"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_skinny_linear_matches_fp32_reference(dtype, rows, shape, bias):
    n, k = shape
    gen = torch.Generator(device="cuda").manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(n, k, device="cuda", generator=gen) * k**-0.5).to(dtype)
    b = torch.randn(n, device="cuda", generator=gen).to(dtype) if bias else None
    ref = skinny_linear_reference(x, weight, b).float()
    for config in CANDIDATES:
        out = skinny_linear(x, weight, b, config)
        assert out.shape == (rows, n) and out.dtype == dtype
        assert rel_err(out, ref) < TOL, config


def test_skinny_linear_rejects_what_it_cannot_do():
    x = torch.randn(MAX_ROWS + 1, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most"):
        skinny_linear(x, weight)
    with pytest.raises(ValueError, match="bf16/fp16"):
        skinny_linear(x[:2].float(), weight.float())
    with pytest.raises(ValueError, match=r"\[M, K\]"):
        skinny_linear(x[:2, :32], weight)
