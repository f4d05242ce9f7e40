"""The split-K streaming W4A16 / W8A16 kernel (kernels/wna16_splitk.py) against the fp32 product with the
dequantized weight, on fresh random codes, scales, zero points and activations: both variants (FMA rows, tensor-core
products), K split or not, groups 32/64/128, odd output widths. Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, requires_triton_device
from test_wna16_gemm import random_packed

from tokenmill.kernels.quant_dispatch import tuned_choice, wna16_cuda_linear
from tokenmill.kernels.splitk import SplitKConfig, fit_split_k
from tokenmill.kernels.wna16_gemm import WNA16Config, wna16_linear_reference
from tokenmill.kernels.wna16_splitk import wna16_splitk_linear

pytestmark = pytest.mark.gpu

BF16_TOL = 2e-2  # the output is rounded to bf16 (~3e-3 relative); a wrong code, scale or split is far above


def _check(device, rows, k, n, bits, group, zeros, configs, seed, dtype=torch.bfloat16):
    packed = random_packed(k, n, bits, group, zeros, dtype, device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    ref = wna16_linear_reference(x.float(), packed, bias.float()).float()
    for config in configs:
        first = wna16_splitk_linear(x, packed, bias, config)
        again = wna16_splitk_linear(x, packed, bias, config)  # the split-K counters were left at zero
        assert first.dtype == dtype and first.shape == (rows, n)
        assert rel_err(first, ref) < BF16_TOL, config
        assert torch.equal(first, again), config  # partials summed in split order: deterministic


@requires_triton_device
@pytest.mark.parametrize("bits,group,zeros", [(4, 128, False), (4, 64, True), (4, 32, False), (8, 128, True),
                                              (8, 32, False)])
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
def test_fma_streaming_matches_fp32_reference(device, rows, bits, group, zeros):
    """Per-row accumulators (1, 2 or 4 rows a program, several row tiles above) and the 3-D FMA product."""
    block_m = 1 << (rows - 1).bit_length()
    configs = [SplitKConfig(block_m=min(block_m, 4), block_n=32, block_k=128, split_k=3),
               SplitKConfig(block_m=min(block_m, 2), block_n=64, block_k=64, split_k=1),
               SplitKConfig(block_m=block_m, block_n=32, block_k=128, split_k=2, kind="fma"),
               SplitKConfig(block_m=min(block_m, 4), block_n=32, block_k=64, split_k=2, prefetch=True)]
    _check(device, rows, 384, 200, bits, group, zeros, configs, seed=rows + bits + group)


@requires_triton_device
@pytest.mark.parametrize("bits,group,zeros", [(4, 128, True), (4, 64, False), (4, 32, True), (8, 64, False),
                                              (8, 128, True)])
@pytest.mark.parametrize("rows", [1, 3, 16, 64])
def test_tensor_core_streaming_matches_fp32_reference(device, rows, bits, group, zeros):
    """Groups narrower than the K step (4-bit 32/64) scale each word row before the product."""
    configs = [SplitKConfig(block_m=16, block_n=32, block_k=128, split_k=2, kind="dot"),
               SplitKConfig(block_m=32, block_n=64, block_k=256, split_k=1, kind="dot", num_warps=8),
               SplitKConfig(block_m=16, block_n=32, block_k=64, split_k=3, kind="dot_k"),
               SplitKConfig(block_m=32, block_n=64, block_k=256, split_k=1, kind="dot_k"),
               SplitKConfig(block_m=16, block_n=32, block_k=128, split_k=3, kind="dot", prefetch=True)]
    _check(device, rows, 512, 96, bits, group, zeros, configs, seed=rows * 7 + bits + group)


@requires_triton_device
@pytest.mark.parametrize("rows", [1, 4, 9, 100])
def test_default_plan_and_tuned_plan_match_reference(device, rows):
    """The dispatch a layer uses on CUDA: an unmeasured shape's default (the tiled kernel), a tuner's plan entry
    (either kernel)."""
    k, n = 256, 72
    packed = random_packed(k, n, 4, 64, True, torch.float16, device, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).half().to(device)
    ref = wna16_linear_reference(x.float(), packed).float()
    key = 1 << (rows - 1).bit_length()
    for plan in ({}, {key: WNA16Config(16, 32, 32, 2)}, {key: SplitKConfig(block_m=16, block_n=16, kind="dot")}):
        assert rel_err(wna16_cuda_linear(x, packed, None, plan), ref) < 3e-3, plan


@requires_triton_device
def test_tensor_core_kind_on_a_k_too_small_for_its_product_is_a_clear_error(device):
    """K 64 at 4 bits is 8 words: a 'dot' product would have K 8 < 16, which Triton refuses to compile on a GPU (the
    H100 suite's tiny models hit it); the launcher says so instead. The tiled kernel still serves that shape."""
    packed = random_packed(64, 32, 4, 32, True, torch.float16, device, seed=3)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(3)).half().to(device)
    with pytest.raises(ValueError, match="'dot' kind needs K >= 128"):
        wna16_splitk_linear(x, packed, None, SplitKConfig(block_m=16, block_n=16, kind="dot"))
    ref = wna16_linear_reference(x.float(), packed).float()
    assert rel_err(wna16_cuda_linear(x, packed, None, {}), ref) < 3e-3


def test_config_rejects_unknown_kinds_and_row_tiles_the_rows_kernel_lacks():
    with pytest.raises(ValueError, match="not one of"):
        SplitKConfig(kind="gemv")
    with pytest.raises(ValueError, match="1, 2 or 4 rows"):
        SplitKConfig(block_m=8, kind="rows")


def test_split_k_fits_the_workspace():
    assert fit_split_k(8, 1, 4096, 64, 32) == 8
    assert fit_split_k(8, 1, 4096, 64, 3) == 3  # no more splits than K steps
    assert fit_split_k(64, 16, 28672, 64, 1024) * 16 * 28672 <= 1 << 21
    assert fit_split_k(4, 256, 28672, 64, 1024) == 1  # unsplit tiles need no partials


def test_measured_table_entries_build_and_bucket_by_rows(tmp_path, monkeypatch):
    """The shipped H100 table parses into valid configs; a table's entry serves every row count up to its own."""
    import json

    from tokenmill.kernels.quant_dispatch import CONFIGS_ENV, SHIPPED_CONFIGS, config_from_json

    shipped = json.loads(SHIPPED_CONFIGS.read_text())
    entries = [e for fmts in shipped.values() if isinstance(fmts, dict)  # not an architecture's alias
               for shapes in fmts.values() for rows in shapes.values() for e in rows.values()]
    assert entries and all(config_from_json(e) is not None for e in entries)  # no _scaled_mm rows were measured
    table = {"cpu": {"w4a16_g128": {"96x256": {"1": {"kernel": "wna16_gemm", "block_m": 16, "gemv": True},
                                               "16": {"kernel": "splitk", "block_m": 16, "kind": "dot"}}},
                     "fp8": {"96x256": {"4": {"kernel": "scaled_mm"}}}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(CONFIGS_ENV, str(path))
    cpu = torch.device("cpu")
    assert tuned_choice(cpu, "w4a16_g128", 96, 256, 1)[1].gemv
    assert tuned_choice(cpu, "w4a16_g128", 96, 256, 9)[1].kind == "dot"  # 2..16 rows: the 16-row entry
    assert tuned_choice(cpu, "w4a16_g128", 96, 256, 17) == (False, None)  # beyond the table: defaults
    assert tuned_choice(cpu, "w4a16_g128", 64, 256, 1) == (False, None)  # another shape
    assert tuned_choice(cpu, "fp8", 96, 256, 3) == (True, None)  # measured: _scaled_mm
    with pytest.raises(ValueError, match="unknown kernel"):
        config_from_json({"kernel": "marlin"})
