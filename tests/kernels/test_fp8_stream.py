"""The FP8-weight GEMV variants of kernels/fp8_stream.py (fma: full-K programs on int32 words; mma: tensor cores
with f16 operands) against the fp32 product with the dequantized weight on fresh random inputs, and the dispatch
that picks them. sm89+ GPUs, or CPU under TRITON_INTERPRET=1 (there the inline-PTX conversion falls back to
Triton's casts and the tensor-core product to fp32)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import fp8_device, rel_err

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.fp8_quant import quantize_fp8
from tokenmill.kernels.fp8_stream import Fp8StreamConfig, fp8_stream_gemv
from tokenmill.kernels.quant_dispatch import (
    CONFIGS_ENV,
    config_from_json,
    default_fp8_config,
    default_fp8_stream_config,
    fp8_gemv_config,
)

KERNEL_DEVICE = fp8_device  # conftest's ``device`` fixture
needs_fp8 = pytest.mark.skipif(fp8_device() is None, reason="needs CUDA sm89+ and triton (or TRITON_INTERPRET=1)")


def _weights(n: int, k: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, k, generator=gen) * torch.logspace(-2, 0, n)[:, None]  # per-channel ranges differ
    q, scale = quantize_fp8(dense, dim=1)
    return q.to(device), scale.view(-1).to(device)


def _configs(rows: int) -> list[Fp8StreamConfig]:
    mma = [Fp8StreamConfig("mma", block_n=16, block_k=64, split_k=2, asm=False),
           Fp8StreamConfig("mma", block_n=32, block_k=32, split_k=1, num_stages=3, asm=False)]
    if rows > 8:
        return mma
    return mma + [Fp8StreamConfig("fma", block_n=4, pairs=16, num_warps=1),
                  Fp8StreamConfig("fma", block_n=8, pairs=32, num_warps=1, prefetch=True),
                  Fp8StreamConfig("fma", block_n=2, pairs=32, num_warps=1, asm=False, pdl=False)]


@needs_fp8
@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(96, 512), (40, 200)])  # 40 x 200: channel and K tails, K not a multiple of 8
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp8_stream_gemv_matches_dequantized_product(device, rows, n, k, dtype):
    w, scale = _weights(n, k, device, seed=rows + k)
    gen = torch.Generator().manual_seed(rows + n)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    ref = x.float() @ (w.float() * scale[:, None]).t() + bias.float()
    for config in _configs(rows):
        out = fp8_stream_gemv(x, w, scale, config, bias)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert rel_err(out, ref) < 2e-2, config.name
        assert torch.equal(out, fp8_stream_gemv(x, w, scale, config, bias)), config.name  # split-K counters reset


@needs_fp8
@pytest.mark.gpu
@pytest.mark.parametrize("rows,width,dtype", [(1, 48, torch.bfloat16), (3, 20, torch.float16)])
def test_fp8_stream_silu_and_mul_epilogue_equals_the_unfused_pair(device, rows, width, dtype):
    """``act_mul`` (fma kind): a fused gate|up weight's silu(gate) * up in the GEMV's epilogue equals the GEMV then
    kernels/activation.py's kernel bit for bit, and the fp32 reference within the output rounding; 48 gate channels
    fill 8-wide programs, 20 leave a ragged last one (and K = 200 a K tail)."""
    from tokenmill.kernels.activation import silu_and_mul_reference, silu_and_mul_triton

    k = 512 if width == 48 else 200
    w, scale = _weights(2 * width, k, device, seed=rows + width)
    gen = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(2 * width, generator=gen).to(dtype).to(device)
    ref = silu_and_mul_reference(x.float() @ (w.float() * scale[:, None]).t() + bias.float())
    for config in [c for c in _configs(rows) if c.kind == "fma" and c.block_n >= 2]:
        fused = fp8_stream_gemv(x, w, scale, config, bias, act_mul=True)
        assert fused.shape == (rows, width) and fused.dtype == dtype, config.name
        assert torch.equal(fused, silu_and_mul_triton(fp8_stream_gemv(x, w, scale, config, bias))), config.name
        assert rel_err(fused, ref) < 2e-2, config.name
    with pytest.raises(ValueError, match="act_mul takes the 'fma'"):
        fp8_stream_gemv(x, w, scale, _configs(rows)[0], act_mul=True)


@needs_fp8
@pytest.mark.gpu
def test_fp8_stream_gemv_reads_strided_rows_and_large_activations(device):
    """x a column slice of a wider tensor (row stride != K), and bf16 activations past f16's range (the mma
    kind's 2^-4 prescale keeps them finite)."""
    w, scale = _weights(64, 256, device, seed=7)
    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(3, 320, generator=gen)
    wide[:, 5] = 2.0e5  # > 65504: inf in f16 without the prescale
    x = wide.bfloat16().to(device)[:, 32:288]
    ref = x.float() @ (w.float() * scale[:, None]).t()
    for config in _configs(3):
        assert rel_err(fp8_stream_gemv(x, w, scale, config), ref) < 2e-2, config.name


@needs_fp8
def test_fp8_stream_gemv_rejects_bad_inputs(device):
    w, scale = _weights(32, 64, device, seed=0)
    x = torch.randn(1, 64).bfloat16().to(device)
    with pytest.raises(ValueError, match="one weight scale per output channel"):
        fp8_stream_gemv(x, w, torch.ones(3, device=device), Fp8StreamConfig())
    with pytest.raises(ValueError, match="at most 8 rows"):
        fp8_stream_gemv(torch.randn(9, 64).bfloat16().to(device), w, scale, Fp8StreamConfig())
    with pytest.raises(ValueError, match="e4m3 weights"):
        fp8_stream_gemv(x, w.float(), scale, Fp8StreamConfig())


def test_fp8_stream_config_validation_and_table_entries():
    with pytest.raises(ValueError, match="power of two"):
        Fp8StreamConfig(block_n=6)
    with pytest.raises(ValueError, match="tensor-core tiles"):
        Fp8StreamConfig("mma", block_n=8)
    with pytest.raises(ValueError, match="prefetch"):
        Fp8StreamConfig("mma", block_n=64, prefetch=True)
    entry = {"kernel": "fp8_stream", "kind": "fma", "block_n": 8, "pairs": 128, "num_warps": 4}
    assert config_from_json(entry) == Fp8StreamConfig("fma", block_n=8, pairs=128)
    assert default_fp8_stream_config(1, 4096, 4096).kind == "fma"
    assert default_fp8_stream_config(1, 4096, 4098).kind == "mma"  # K % 4 != 0: no int32 word view
    assert default_fp8_stream_config(16, 4096, 4096).kind == "mma"


def test_fp8_dispatch_serves_a_table_entry_only_within_its_kind_rows(tmp_path, monkeypatch):
    """A measured table's row buckets cover the counts below them: an fma entry in the 16-row bucket must not take
    9-16 rows (past the fma kind's 8), which get the default instead; within its rows it is served as written."""
    fma = {"kernel": "fp8_stream", "kind": "fma", "block_n": 8, "pairs": 128}
    table = {"cpu": {"fp8": {"64x64": {"2": fma, "16": fma}}}}
    path = tmp_path / "quant_gemv.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(CONFIGS_ENV, str(path))
    assert fp8_gemv_config(torch.zeros(2, 64), 64, {}) == config_from_json(fma)
    assert fp8_gemv_config(torch.zeros(12, 64), 64, {}) == default_fp8_config(12, 64, 64)
    plan = Fp8StreamConfig("mma", block_n=64, asm=False)
    assert fp8_gemv_config(torch.zeros(12, 64), 64, {16: plan}) is plan  # a layer's plan is taken as given


@needs_fp8
@pytest.mark.gpu
@pytest.mark.parametrize("rows,dtype", [(1, torch.bfloat16), (3, torch.float16)])
def test_fp8_stream_next_norm_epilogue_feeds_the_rms_prologue(device, rows, dtype):
    """fma kind: ``residual`` + ``next_norm`` make the next norm's input and its sums (the two-slot ring) and
    ``rms`` consumers scale by 1 / rms from it: the stream equals the GEMV plus the residual rounded as the norm
    kernel adds (on CUDA; within a bf16 step under the interpreter), the chain o -> gate_up|act -> down -> qkv matches fp32 norm-then-product, twice round the ring;
    K = 200 and 40 channels leave tails."""
    from tokenmill.kernels.activation import silu_and_mul_reference
    from tokenmill.kernels.gemv_epilogue import EpilogueNorm, NormSums, PrologueRms

    hidden, inter = 200, 96
    o, gate_up, down, qkv = (_weights(n, k, device, seed=rows + i) for i, (n, k) in
                             enumerate([(hidden, hidden), (2 * inter, hidden), (hidden, inter), (40, hidden)]))
    gen = torch.Generator().manual_seed(rows + 11)
    norm_w = [(1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype).to(device) for _ in range(2)]
    x = torch.randn(rows, hidden, generator=gen).to(dtype).to(device)
    residual = (3 * torch.randn(rows, hidden, generator=gen)).to(dtype).to(device)
    sums = NormSums.make(torch.device(device))

    def product(h: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return h.float() @ (weight[0].float() * weight[1][:, None]).t()

    def normed32(stream: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        s = stream.float()
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()

    for config in [c for c in _configs(rows) if c.kind == "fma" and c.block_n >= 2]:
        h = torch.empty(rows, hidden, dtype=dtype, device=device)
        stream = fp8_stream_gemv(x, *o, config, residual=residual, next_norm=EpilogueNorm(norm_w[0], h, sums, 0))
        want_stream = (fp8_stream_gemv(x, *o, config).float() + residual.float()).to(dtype)
        assert (torch.equal(stream, want_stream) if device == "cuda"  # the interpreter rounds bf16 its own way
                else torch.allclose(stream.float(), want_stream.float(), rtol=2 ** -7, atol=0)), config.name
        assert torch.all(sums.ring[1, :rows] == 0)
        assert torch.allclose(sums.ring[0, :rows], stream.float().pow(2).sum(-1), rtol=1e-5, atol=0)
        act = fp8_stream_gemv(h, *gate_up, config, act_mul=True, rms=PrologueRms(1e-5, sums, 0))
        assert rel_err(act, silu_and_mul_reference(product(normed32(stream, norm_w[0]), gate_up))) < 2e-2, config.name
        h2 = torch.empty_like(h)
        stream2 = fp8_stream_gemv(act, *down, config, residual=stream, next_norm=EpilogueNorm(norm_w[1], h2, sums, 1))
        assert torch.all(sums.ring[0, :rows] == 0)
        got = fp8_stream_gemv(h2, *qkv, config, rms=PrologueRms(1e-5, sums, 1))
        assert rel_err(got, product(normed32(stream2, norm_w[1]), qkv)) < 2e-2, config.name
    with pytest.raises(ValueError, match="take the 'fma' kind"):
        fp8_stream_gemv(x, *o, _configs(rows)[0], residual=residual)


@pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs triton, compiled (the interpreter swaps jit functions for its own)")
@pytest.mark.parametrize("act_mul,rms,next_norm", [(False, False, False), (True, False, False), (True, True, False),
                                                   (False, False, True)])
def test_fp8_fma_kernel_compiles_for_sm90_without_spills(act_mul, rms, next_norm):
    """The shipped 1-row gate_up entry's kernel (inline-PTX conversions, PDL), with and without the SiLU-and-mul
    epilogue, the rms prologue and the residual / next-norm epilogue, compiled for sm_90 without a GPU: no spills."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from triton_sass import compile_sm90

    from tokenmill.kernels.fp8_stream import _fp8_fma_kernel

    args = dict(x_ptr="*i64", w_ptr="*i32", ws_ptr="*fp32", b_ptr="*fp32", out_ptr="*bf16", M="i32:1", N="i32:16",
                KW="i32:16", stride_xq="i32:16", stride_ww="i32:16", stride_om="i32:16", HAS_BIAS=False, ROWS=1,
                BLOCK_N=16, PAIRS=64, X_BF16=True, EVEN=True, ASM=True, PREFETCH=False, PDL=True, ACT_MUL=act_mul,
                sums_ptr="*fp32", eps="fp32", RMS=rms, res_ptr="*bf16", stride_resm="i32:16", ADD_RESIDUAL=next_norm,
                next_nw_ptr="*bf16", h_ptr="*bf16", stride_hm="i32:16", next_sums_ptr="*fp32", zero_ptr="*fp32",
                NEXT_NORM=next_norm)
    assert compile_sm90(_fp8_fma_kernel, args, num_warps=2).spill_bytes == 0
