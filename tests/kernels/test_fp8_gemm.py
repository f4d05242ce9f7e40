"""FP8 W8A8 on the GPU: the fused per-token quantize kernel against the torch reference, and the
``torch._scaled_mm`` linear against the fp64 product of its dequantized operands. sm89+ only (the
quantize kernel also runs on CPU under ``TRITON_INTERPRET=1``, for debugging)."""

from __future__ import annotations

import pytest
import torch
from conftest import fp8_device, rel_err

from tokenmill.kernels.fp8_quant import FP8_E4M3, quantize_fp8, quantize_fp8_per_token_triton
from tokenmill.quantization.fp8 import fp8_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(fp8_device() is None, reason="needs CUDA sm89+ and triton")]
KERNEL_DEVICE = fp8_device  # conftest's ``device`` fixture


@pytest.mark.parametrize("shape", [(1, 4096), (37, 14336), (5, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_token_quant_kernel_matches_reference(device, shape, dtype):
    x = (torch.randn(shape, device=device) * torch.logspace(-3, 2, shape[0], device=device)[:, None]).to(dtype)
    x[0, :7] = 0.0
    q, scales = quantize_fp8_per_token_triton(x)
    q_ref, scales_ref = quantize_fp8(x, dim=-1)
    assert q.dtype == FP8_E4M3 and scales.shape == (shape[0], 1)
    torch.testing.assert_close(scales, scales_ref, rtol=0, atol=0)
    if device == "cpu":
        pytest.skip("Triton's interpreter rounds fp32 -> e4m3 wrongly at exponent carries (see test_fp8_kv_kernels)")
    same = (q.float() == q_ref.float()).float().mean().item()
    assert same >= 0.999  # the same division and rounding; a last-bit tie may differ
    assert torch.isclose(q.float(), q_ref.float(), rtol=0.13, atol=0).all()


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("shape", [(4096, 6144), (14336, 4096)])  # Llama-3-8B: qkv (K=4096), down (K=14336)
@pytest.mark.parametrize("static", [False, True])
def test_scaled_mm_linear_matches_dequantized_product(rows, shape, static):
    if fp8_device() != "cuda":
        pytest.skip("torch._scaled_mm needs a CUDA GPU")
    in_features, out_features = shape
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, in_features, device="cuda", generator=gen).to(torch.bfloat16)
    w, w_scale = quantize_fp8(torch.randn(out_features, in_features, device="cuda", generator=gen) * 0.02, dim=1)
    bias = torch.randn(out_features, device="cuda", generator=gen).to(torch.bfloat16)
    input_scale = (x.abs().max().float() / 448.0) if static else None
    out = fp8_linear(x, w, w_scale.view(-1), bias, input_scale)
    # Reference: the same FP8 operands (quantized by the torch reference), multiplied in fp64.
    if static:
        xq = (x.float() / input_scale).clamp(-448, 448).to(FP8_E4M3)
        xs = input_scale
    else:
        xq, xs = quantize_fp8(x, dim=-1)
    want = (xq.double() * xs.double()) @ (w.double() * w_scale.double()).t() + bias.double()
    assert out.dtype == torch.bfloat16 and out.shape == (rows, out_features)
    assert rel_err(out, want) <= 1e-2
