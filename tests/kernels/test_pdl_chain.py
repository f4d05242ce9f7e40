"""Programmatic dependent launch: kernels launched early must still see the previous kernel's output.

On Hopper our kernels start while the kernel before them drains and wait (gdc_wait) before touching memory. A
long chain of dependent launches (RMSNorm with residual → SiLU-and-mul → GEMV → ...) captured in a CUDA graph, as
in a decode step, must equal the same chain run eagerly in fp32 torch. On GPUs before Hopper PDL is off and the
test checks the plain chain.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import rel_err, requires_cuda
from test_wna16_gemm import random_packed

from tokenmill.kernels._triton import PDL_MAX_ROWS, pdl_early_launch, pdl_launch, use_pdl
from tokenmill.kernels.activation import silu_and_mul_reference, silu_and_mul_triton
from tokenmill.kernels.gemv import gemv
from tokenmill.kernels.rms_norm import rms_norm_reference, rms_norm_triton
from tokenmill.kernels.w4_gemv import W4GemvConfig, dequantize_k_major, repack_k_major, w4_gemv

pytestmark = requires_cuda
HIDDEN, INTER, LAYERS = 512, 1024, 24


def _layers(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    return [
        (
            (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype).cuda(),
            (torch.randn(2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5).to(dtype).cuda(),
            (torch.randn(HIDDEN, INTER, generator=gen) / INTER**0.5).to(dtype).cuda(),
        )
        for _ in range(LAYERS)
    ]


def _chain(x, residual, layers, norm, act, linear):
    for norm_w, up_w, down_w in layers:
        h, residual = norm(x, norm_w, 1e-6, residual)
        x = linear(act(linear(h, up_w)), down_w)
    return x + residual


def test_pdl_flag_follows_the_device_and_the_row_count():
    assert pdl_launch(torch.device("cpu"), 1) == {"PDL": False, "launch_pdl": False}
    hopper = torch.cuda.get_device_capability()[0] >= 9
    on = hopper and os.environ.get("TOKENMILL_PDL", "1") != "0"
    assert use_pdl(torch.device("cuda")) == on
    assert pdl_launch(torch.device("cuda"), PDL_MAX_ROWS) == {"PDL": on, "launch_pdl": on}
    assert pdl_launch(torch.device("cuda"), PDL_MAX_ROWS + 1) == {"PDL": False, "launch_pdl": False}


def _check_graph(layers, layers32, linear) -> None:
    """The chain captured in a CUDA graph and replayed on new inputs equals it run eagerly, and that the fp32 chain."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, HIDDEN, generator=gen).to(dtype).cuda()
    residual = torch.randn(1, HIDDEN, generator=gen).to(dtype).cuda()

    def ours() -> torch.Tensor:
        return _chain(x, residual, layers, rms_norm_triton, silu_and_mul_triton, linear)

    ours()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ours()
    # New inputs every replay: a kernel that read an intermediate before its producer finished would see the
    # previous replay's values and differ from the eager chain.
    for _ in range(3):
        x.copy_(torch.randn(1, HIDDEN, generator=gen).to(dtype))
        residual.copy_(torch.randn(1, HIDDEN, generator=gen).to(dtype))
        captured.fill_(float("nan"))
        graph.replay()
        eager = ours()
        expected = _chain(x.float(), residual.float(), layers32, rms_norm_reference, silu_and_mul_reference,
                          lambda a, w: a @ w.t())
        torch.cuda.synchronize()
        assert rel_err(eager, expected) < 2e-2
        torch.testing.assert_close(captured, eager, rtol=0, atol=0)


def test_a_graph_of_dependent_kernels_matches_the_fp32_chain():
    layers = _layers(torch.bfloat16)
    _check_graph(layers, [tuple(w.float() for w in layer) for layer in layers], gemv)


@pytest.mark.parametrize("early", [False, True])
def test_a_graph_of_preloading_w4_gemvs_matches_the_fp32_chain(monkeypatch, early):
    """The K-major W4 GEMV launched with PDL, its first chunks requested before its wait (registers, L2), between
    PDL norms and SiLU-mul; with TOKENMILL_PDL_EARLY_LAUNCH=1 every kernel also releases the next after its wait."""
    monkeypatch.setenv("TOKENMILL_PDL_EARLY_LAUNCH", "1" if early else "0")
    pdl_early_launch.cache_clear()
    try:
        layers, layers32 = [], []
        for i, (norm_w, up_w, down_w) in enumerate(_layers(torch.bfloat16)):
            up, down = (repack_k_major(random_packed(w.shape[1], w.shape[0], 4, 128, True, torch.bfloat16, "cuda",
                                                     seed=2 * i + j)) for j, w in enumerate((up_w, down_w)))
            layers.append((norm_w, up, down))
            layers32.append((norm_w.float(), dequantize_k_major(up).t(), dequantize_k_major(down).t()))
        configs = [W4GemvConfig("kmajor", block_n=4, groups=1, num_warps=2, pdl=True, preload_steps=2),
                   W4GemvConfig("kmajor", block_n=8, groups=2, pdl=True, preload_steps=1)]
        _check_graph(layers, layers32, lambda a, w: w4_gemv(a, w, configs[w.in_features > HIDDEN]))
        assert pdl_early_launch() == early
    finally:
        monkeypatch.undo()
        pdl_early_launch.cache_clear()
