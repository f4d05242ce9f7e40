"""GPTQ and AWQ against round-to-nearest on inputs with the structure they exploit (correlated channels,
outlier activations), measured by the output error tr(D H D^T) they minimise."""

from __future__ import annotations

import torch

from tokenmill.quantization.awq import output_error, search_scales
from tokenmill.quantization.gptq import gptq_quantize
from tokenmill.quantization.packing import rtn_quantize


def _inputs(n: int, k: int, seed: int, outliers: bool = False) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=gen) @ mix  # correlated channels
    if outliers:
        x[:, :4] *= 20.0  # a few channels carry large activations, as in real LLMs
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * x.t() @ x / x.shape[0]


def test_gptq_beats_rtn_on_correlated_inputs():
    k, out = 128, 64
    weight = torch.randn(out, k, generator=torch.Generator().manual_seed(0))
    h = _hessian(_inputs(1024, k, seed=1))
    for bits, group, act_order in [(4, 32, False), (4, -1, True), (8, 64, False), (4, 32, True)]:
        rtn = rtn_quantize(weight, bits, group, sym=True).dequantize()
        gptq = gptq_quantize(weight, h, bits, group, sym=True, act_order=act_order)
        assert output_error(gptq.dequantize() - weight, h) < 0.8 * output_error(rtn - weight, h), (bits, group)
        assert gptq.codes.min() >= 0 and gptq.codes.max() < 2**bits


def test_gptq_act_order_records_groups_in_g_idx():
    k = 64
    weight = torch.randn(16, k, generator=torch.Generator().manual_seed(2))
    h = _hessian(_inputs(256, k, seed=3, outliers=True))
    qw = gptq_quantize(weight, h, 4, 16, sym=True, act_order=True)
    assert sorted(qw.g_idx.tolist()) == sorted([i // 16 for i in range(k)])
    assert qw.g_idx.tolist() != [i // 16 for i in range(k)]  # the outlier channels moved to group 0
    assert set(qw.g_idx[:4].tolist()) == {0}


def test_awq_scales_beat_rtn_with_outlier_activations():
    k, out = 128, 64
    weight = torch.randn(out, k, generator=torch.Generator().manual_seed(4))
    x = _inputs(1024, k, seed=5, outliers=True)
    h = _hessian(x)
    scale = search_scales([weight], h, x.abs().mean(0), bits=4, group_size=32)
    awq = rtn_quantize(weight * scale, 4, 32, sym=False).dequantize() / scale
    rtn = rtn_quantize(weight, 4, 32, sym=False).dequantize()
    assert output_error(awq - weight, h) < 0.8 * output_error(rtn - weight, h)
    assert scale[:4].min() > scale[4:].max()  # the outlier channels are the ones scaled up
