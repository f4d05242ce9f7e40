"""Start-up GEMM tuning: every choice it makes computes the same product as the fp32 reference."""

from __future__ import annotations

import torch
from conftest import rel_err, requires_cuda

from tokenmill.kernels.skinny_gemm import CANDIDATES, skinny_linear, skinny_linear_reference
from tokenmill.model.layers import Linear
from tokenmill.runner.linear_tuning import ROW_COUNTS, tune_skinny_linears

pytestmark = requires_cuda


def test_tuned_linears_match_reference_at_every_row_count():
    torch.manual_seed(0)
    model = torch.nn.ModuleList(
        [Linear(4096, 4096), Linear(1024, 151936 // 4), Linear(1024, 3000, bias=True)]
    ).to("cuda", torch.bfloat16)
    for module in model:
        torch.nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            torch.nn.init.normal_(module.bias)
    plans = tune_skinny_linears(model)
    assert len(plans) == 3
    for module in model:
        assert set(module.skinny_plan) <= set(ROW_COUNTS)
        assert all(config in CANDIDATES for config in module.skinny_plan.values())
        for rows in (1, 3, 8, 16, 40):  # 40: beyond the skinny range, cuBLAS
            x = torch.randn(rows, module.weight.shape[1], device="cuda", dtype=torch.bfloat16)
            ref = skinny_linear_reference(x, module.weight, module.bias).float()
            assert rel_err(module(x), ref) < 1e-2


def test_fp32_linears_are_left_to_cublas():
    model = torch.nn.ModuleList([Linear(256, 256)]).to("cuda")
    assert tune_skinny_linears(model) == {}
    assert model[0].skinny_plan == {}


def test_linear_follows_its_plan_per_row_count():
    torch.manual_seed(1)
    module = Linear(1024, 2048).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(module.weight, std=0.02)
    module.skinny_plan = {1: CANDIDATES[0], 4: CANDIDATES[1]}
    for rows, config in [(1, CANDIDATES[0]), (3, CANDIDATES[1]), (4, CANDIDATES[1])]:
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(module(x), skinny_linear(x, module.weight, None, config))
    for rows in (2, 8, 40):  # no plan entry for 2 or 8, and 40 is past the skinny range: cuBLAS
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(module(x), torch.nn.functional.linear(x, module.weight))
