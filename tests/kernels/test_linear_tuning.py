"""Start-up GEMM tuning: every choice it makes computes the same product as the fp32 reference."""

from __future__ import annotations

import torch
from conftest import rel_err, requires_cuda
from linear_helpers import rank_context
from torch import nn

from tokenmill.kernels.gemv import GEMV_CANDIDATES, gemv
from tokenmill.kernels.tiled_gemm import (
    SKINNY_CANDIDATES,
    WIDE_CANDIDATES,
    tiled_linear,
    tiled_linear_reference,
)
from tokenmill.model.linear import ColumnParallelLinear as Linear
from tokenmill.model.linear import QKVParallelLinear, RowParallelLinear
from tokenmill.model.linear_method import DenseLinearMethod
from tokenmill.runner import linear_tuning
from tokenmill.runner.linear_tuning import ROW_COUNTS, tune_linears

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
    plans = tune_linears(model, max_rows=200)  # rounds up: row counts 1..256 are tuned
    assert len(plans) == 3
    for module in model:
        assert set(module.gemm_plan) <= set(ROW_COUNTS)
        assert all(c in GEMV_CANDIDATES + SKINNY_CANDIDATES + WIDE_CANDIDATES for c in module.gemm_plan.values())
        for rows in (1, 3, 8, 16, 40, 200, 300):  # 300: beyond every plan, cuBLAS
            x = torch.randn(rows, module.weight.shape[1], device="cuda", dtype=torch.bfloat16)
            ref = tiled_linear_reference(x, module.weight, module.bias).float()
            assert rel_err(module(x), ref) < 1e-2


def test_tuning_times_row_counts_up_to_the_largest_decode_batch(monkeypatch):
    timed: list[int] = []
    original = linear_tuning.candidates_for

    def recording(rows):
        timed.append(rows)
        return original(rows)

    monkeypatch.setattr(linear_tuning, "candidates_for", recording)
    module = Linear(512, 1024).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(module.weight, std=0.02)
    for max_rows, expected in [(8, [1, 2, 4, 8]), (40, [1, 2, 4, 8, 16, 32, 64])]:  # 40 rounds up to 64
        timed.clear()
        tune_linears(torch.nn.ModuleList([module]), max_rows=max_rows)
        assert timed == expected
        assert set(module.gemm_plan) <= set(expected)


def test_fp32_linears_are_left_to_cublas():
    model = torch.nn.ModuleList([Linear(256, 256)]).to("cuda")
    assert tune_linears(model) == {}
    assert model[0].gemm_plan == {}


def test_linear_follows_its_plan_per_row_count():
    torch.manual_seed(1)
    module = Linear(1024, 2048).to("cuda", torch.bfloat16)
    torch.nn.init.normal_(module.weight, std=0.02)
    module.gemm_plan = {1: GEMV_CANDIDATES[1], 4: SKINNY_CANDIDATES[1], 64: WIDE_CANDIDATES[2]}
    for rows, config in [(3, SKINNY_CANDIDATES[1]), (4, SKINNY_CANDIDATES[1]), (40, WIDE_CANDIDATES[2]),
                         (64, WIDE_CANDIDATES[2])]:
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(module(x), tiled_linear(x, module.weight, None, config))
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(module(x), gemv(x, module.weight, None, GEMV_CANDIDATES[1]))
    for rows in (2, 8, 65):  # no plan entry for 2, 8 or 128 (65 rounds up to 128): cuBLAS
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(module(x), torch.nn.functional.linear(x, module.weight))


class UntunableMethod(DenseLinearMethod):
    """A format with no dense weight for the tuner (as the packed ones are)."""

    def tunable_weight(self, layer: nn.Module) -> None:
        return None


def test_tuning_follows_each_rank_partition_and_skips_formats_without_a_dense_weight():
    ctx = rank_context(1, 2)  # rank 1 of 2: this rank's shapes, and row-parallel biases outside the matmul
    qkv = QKVParallelLinear(1024, 64, 16, 4, bias=True, parallel=ctx)
    down = RowParallelLinear(2048, 1024, bias=True, parallel=ctx)
    other = Linear(1024, 512, linear_method=UntunableMethod())
    model = nn.ModuleList([qkv, down, other]).to("cuda", torch.bfloat16)
    for param in model.parameters():  # biases too: fresh random values, never uninitialised memory
        torch.nn.init.normal_(param, std=0.02)
    plans = tune_linears(model, max_rows=4)
    assert set(plans) == {((8 + 2 + 2) * 64, 1024, True), (1024, 1024, False)}
    assert other.gemm_plan == {}
    for module, bias in ((qkv, qkv.bias), (down, None)):
        for rows in (1, 3, 4):
            x = torch.randn(rows, module.weight.shape[1], device="cuda", dtype=torch.bfloat16)
            ref = tiled_linear_reference(x, module.weight, bias).float()
            assert rel_err(module.linear_method.apply(module, x, bias), ref) < 1e-2
