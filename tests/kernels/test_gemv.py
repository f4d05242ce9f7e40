"""The GEMV's limits and dispatch (its values against fp32 are checked with the tiled GEMM's in test_tiled_gemm.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

from tokenmill.kernels.decode_linear import candidates_for, decode_linear
from tokenmill.kernels.gemv import GEMV_CANDIDATES, GemvConfig, gemv
from tokenmill.kernels.tiled_gemm import SKINNY_CANDIDATES, tiled_linear

pytestmark = requires_cuda


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
