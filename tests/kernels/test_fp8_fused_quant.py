"""RMSNorm (+ residual) and SiLU-and-mul that write e4m3 + per-token scales (kernels/rms_norm.py, activation.py),
against the fp32 statement (norm / activation, then quantize) and the unfused composition, on fresh random rows.
sm89+ CUDA; on CPU under ``TRITON_INTERPRET=1``, whose fp32 -> e4m3 conversion is wrong at exponent carries and
whose fp32 -> bf16 conversion truncates: there the codes are compared loosely and the rest to one more ulp."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fp8_device

from tokenmill.kernels.activation import (
    FP8_ACT_MAX_COLS,
    silu_and_mul_fp8_triton,
    silu_and_mul_triton,
)
from tokenmill.kernels.fp8_quant import FP8_E4M3, FP8_E4M3_MAX, Fp8Tokens, quantize_fp8_per_token_triton
from tokenmill.kernels.rms_norm import rms_norm_fp8_reference, rms_norm_fp8_triton, rms_norm_triton

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(fp8_device() is None, reason="needs CUDA sm89+ and triton")]
KERNEL_DEVICE = fp8_device  # conftest's ``device`` fixture
EPS = 1e-5


def _rows(rows: int, cols: int, device: str, dtype: torch.dtype, seed: int,
          decades: tuple[float, float] = (-2, 3)) -> torch.Tensor:
    """Random rows whose magnitudes span ``decades`` (per-token scales must follow each row)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen) * torch.logspace(*decades, rows)[:, None]
    return x.to(device=device, dtype=dtype)


def _silu_and_mul_kernel_pair(x: torch.Tensor) -> Fp8Tokens:
    """The engine's unfused path: the SiLU-mul kernel (fp32 inside, one rounding to x's dtype), then per-token
    quantization. torch's F.silu(gate) * up rounds twice in bf16/fp16, so it is not the composition to match."""
    values, scales = quantize_fp8_per_token_triton(silu_and_mul_triton(x))
    return Fp8Tokens(values, scales, x.dtype)


def _dtype_rtol(device: str) -> float:
    """Two roundings to bf16/fp16 (norm, then times the weight): 2^-8 each; truncations in the interpreter."""
    return 2**-7 if device == "cuda" else 2**-5


def _check_against_fp32(got: Fp8Tokens, want32: torch.Tensor, device: str) -> None:
    """Scales follow the fp32 row absmax within the activations' dtype rounding; each value is e4m3's rounding of
    the fp32 value (half a step: 2^-4 relative, 2^-10 of the scale among subnormals) plus that dtype rounding."""
    scale32 = want32.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
    torch.testing.assert_close(got.scales, scale32, rtol=_dtype_rtol(device), atol=0)
    if device == "cpu":
        return  # the interpreter's e4m3 rounding: see the module docstring
    deq = got.values.float() * got.scales
    bound = (2**-4 + 2**-7) * want32.abs() + got.scales * 2**-10
    assert ((deq - want32).abs() <= bound).all()


def _check_against_composition(got: Fp8Tokens, want: Fp8Tokens, device: str) -> None:
    """The unfused pair's codes: the same roundings, so the same codes but where a last-bit difference in the
    norm moves a value across a rounding tie (one e4m3 step)."""
    assert got.values.dtype == FP8_E4M3 and got.values.shape == want.values.shape and got.dtype == want.dtype
    assert got.scales.shape == (want.values.shape[0], 1) and got.scales.dtype == torch.float32
    torch.testing.assert_close(got.scales, want.scales, rtol=_dtype_rtol(device), atol=0)
    same = (got.values.float() == want.values.float()).float().mean().item()
    if device == "cpu":
        assert same >= 0.9  # the interpreter halves values whose rounding carries into the exponent
        return
    assert same >= 0.999
    assert torch.isclose(got.values.float(), want.values.float(), rtol=0.13, atol=2**-9).all()


@pytest.mark.parametrize(("rows", "hidden"), [(1, 4096), (37, 4096), (5, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_fp8_matches_norm_then_quantize(device, rows, hidden, dtype, with_residual):
    x = _rows(rows, hidden, device, dtype, seed=rows + hidden)
    residual = _rows(rows, hidden, device, dtype, seed=7 * rows) if with_residual else None
    gen = torch.Generator(device="cpu").manual_seed(hidden)
    weight = (1.0 + 0.3 * torch.randn(hidden, generator=gen)).to(device=device, dtype=dtype)
    got, hidden_out = rms_norm_fp8_triton(x, weight, EPS, residual)
    summed = x if residual is None else x + residual
    # exact on the GPU; the interpreter truncates fp32 -> bf16 instead of rounding (one ulp)
    torch.testing.assert_close(hidden_out, summed, rtol=0 if device == "cuda" else 2**-7, atol=0)
    h32 = summed.float()
    want32 = weight.float() * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS))
    _check_against_fp32(got, want32, device)
    _check_against_composition(got, rms_norm_fp8_reference(x, weight, EPS, residual)[0], device)


@pytest.mark.parametrize(("rows", "inter"), [(1, 14336), (19, 14336), (6, 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_and_mul_fp8_matches_activation_then_quantize(device, rows, inter, dtype):
    # fp16: gate * up neither overflows nor lands among fp16's subnormals
    decades = (-2, 3) if dtype == torch.bfloat16 else (-0.5, 1.5)
    x = _rows(rows, 2 * inter, device, dtype, seed=rows + inter, decades=decades)
    got = silu_and_mul_fp8_triton(x)
    gate, up = x.float().chunk(2, dim=-1)
    _check_against_fp32(got, F.silu(gate) * up, device)
    _check_against_composition(got, _silu_and_mul_kernel_pair(x), device)


def test_silu_and_mul_fp8_wider_than_one_program_takes_the_two_kernels(device):
    x = _rows(2, 2 * (FP8_ACT_MAX_COLS + 8), device, torch.bfloat16, seed=5, decades=(-1, 1))
    got = silu_and_mul_fp8_triton(x)
    gate, up = x.float().chunk(2, dim=-1)
    _check_against_fp32(got, F.silu(gate) * up, device)
    _check_against_composition(got, _silu_and_mul_kernel_pair(x), device)


def test_fused_kernels_equal_the_unfused_kernel_pairs(device):
    """On one device the fused programs and the unfused kernel pairs (norm, then quantize_fp8_per_token) make the
    same roundings in the same order: identical codes and scales."""
    if device == "cpu":
        pytest.skip("bit equality is a property of the GPU's conversion")
    x = _rows(64, 4096, device, torch.bfloat16, seed=1)
    residual = _rows(64, 4096, device, torch.bfloat16, seed=2)
    weight = (1.0 + 0.3 * torch.randn(4096, device=device)).to(torch.bfloat16)
    fused, _ = rms_norm_fp8_triton(x, weight, EPS, residual)
    normed, _ = rms_norm_triton(x, weight, EPS, residual)
    values, scales = quantize_fp8_per_token_triton(normed)
    assert torch.equal(fused.values.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(fused.scales, scales)
    gate_up = _rows(64, 2 * 14336, device, torch.bfloat16, seed=3)
    fused_act = silu_and_mul_fp8_triton(gate_up)
    values, scales = quantize_fp8_per_token_triton(silu_and_mul_triton(gate_up))
    assert torch.equal(fused_act.values.view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(fused_act.scales, scales)


def test_fp8_kernels_refuse_shapes_they_do_not_take(device):
    with pytest.raises(ValueError, match="tokens, hidden"):
        rms_norm_fp8_triton(torch.ones(2, 3, 8, device=device), torch.ones(8, device=device), EPS)
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul_fp8_triton(torch.ones(2, 7, device=device))
