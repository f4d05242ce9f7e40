"""The W4A16 GEMV variants (kernels/w4_gemv.py) against the fp32 product with the dequantized weight, on fresh
random codes, scales, zero points, activations and bias: K-major and N-major FMA kinds, the tensor-core kinds
(plain Triton; their inline-PTX form on CUDA only), K splits reduced by the workspace or by atomics, odd widths,
groups 32/64/128, 1-16 rows, with and without zero points. Runs on CUDA, or on CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, requires_cuda, requires_triton_device
from test_wna16_gemm import random_packed

from tokenmill.kernels._triton import HAS_TRITON, PDL_EARLY_LAUNCH
from tokenmill.kernels.w4_gemv import W4GemvConfig, dequantize_k_major, repack_k_major, w4_gemv
from tokenmill.kernels.wna16_gemm import dequantize, wna16_linear_reference

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}  # output rounding: bf16 ~3e-3, fp16 ~3e-4 relative


def _check(device, rows, k, n, group, zeros, dtype, configs, seed):
    packed = random_packed(k, n, 4, group, zeros, dtype, device, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    ref = wna16_linear_reference(x.float(), packed, bias.float()).float()
    kmajor = repack_k_major(packed)
    for config in configs:
        weight = kmajor if config.kind == "kmajor" else packed
        first = w4_gemv(x, weight, config, bias)
        again = w4_gemv(x, weight, config, bias)  # the split-K counters were left at zero
        assert first.dtype == dtype and first.shape == (rows, n), config
        assert rel_err(first, ref) < TOL[dtype], config
        if config.reduce == "finish":
            assert torch.equal(first, again), config  # partials summed in split order: deterministic
        else:
            assert rel_err(again, ref) < TOL[dtype], config


@requires_triton_device
@pytest.mark.parametrize("rows,group,zeros,dtype", [(1, 128, True, torch.bfloat16), (3, 64, False, torch.float16),
                                                    (8, 32, True, torch.bfloat16), (2, 128, False, torch.bfloat16)])
def test_fma_kinds_match_fp32_reference(device, rows, group, zeros, dtype):
    """Five groups of K (chunks and splits with a ragged tail) and 200 output channels (partial tiles)."""
    configs = [W4GemvConfig("kmajor", block_n=4), W4GemvConfig("kmajor", block_n=8, groups=2),
               W4GemvConfig("kmajor", block_n=4, groups=2, prefetch=True),
               W4GemvConfig("nmajor", block_n=16, groups=2), W4GemvConfig("nmajor", 32, 1, reduce="atomic"),
               W4GemvConfig("nmajor", block_n=64, groups=8)]
    _check(device, rows, 5 * group, 200, group, zeros, dtype, configs, seed=rows * 11 + group)


@requires_triton_device
@pytest.mark.parametrize("rows,zeros,dtype", [(1, True, torch.bfloat16), (5, False, torch.float16),
                                              (16, True, torch.bfloat16), (12, False, torch.bfloat16)])
def test_tensor_core_kind_matches_fp32_reference(device, rows, zeros, dtype):
    configs = [W4GemvConfig("mma", block_n=16, groups=2), W4GemvConfig("mma", 32, 1, reduce="atomic"),
               W4GemvConfig("mma_k", block_n=16, groups=2), W4GemvConfig("mma_k", 32, 4, reduce="atomic")]
    _check(device, rows, 3 * 128, 72, 128, zeros, dtype, configs, seed=rows * 5 + zeros)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inline_ptx_dequantize_matches_fp32_reference(dtype):
    """The lop3 pair dequantization: GPU only (the interpreter cannot run PTX); the probe checks it too."""
    configs = [W4GemvConfig("mma", block_n=32, groups=2, asm=True), W4GemvConfig("mma_k", 64, 1, "atomic", True),
               W4GemvConfig("mma_k", block_n=128, groups=8, asm=True, num_warps=8)]
    for rows in (1, 7, 16):
        _check("cuda", rows, 4 * 128, 136, 128, rows % 2 == 1, dtype, configs, seed=rows)


@requires_triton_device
def test_launcher_rejects_what_the_kernels_cannot_serve(device):
    packed = random_packed(256, 32, 4, 64, True, torch.bfloat16, device, seed=0)
    x = torch.randn(9, 256).to(torch.bfloat16).to(device)
    with pytest.raises(ValueError, match="at most 8 rows"):
        w4_gemv(x, repack_k_major(packed), W4GemvConfig("kmajor"))
    with pytest.raises(ValueError, match="takes a KMajorWeight"):
        w4_gemv(x[:1], packed, W4GemvConfig("kmajor"))
    with pytest.raises(ValueError, match="takes a PackedWeight"):
        w4_gemv(x[:1], repack_k_major(packed), W4GemvConfig("nmajor", groups=1))
    with pytest.raises(ValueError, match="group size >= 128"):
        w4_gemv(x[:1], packed, W4GemvConfig("mma", groups=1))
    assert w4_gemv(x[:0], packed, W4GemvConfig("nmajor", groups=1)).shape == (0, 32)


def test_config_and_repack_validation():
    with pytest.raises(ValueError, match="not one of"):
        W4GemvConfig(kind="marlin")
    with pytest.raises(ValueError, match="needs groups >= 1"):
        W4GemvConfig(kind="mma")
    with pytest.raises(ValueError, match="power of two"):
        W4GemvConfig(block_n=6)
    with pytest.raises(ValueError, match="tensor-core kinds"):
        W4GemvConfig(asm=True)
    with pytest.raises(ValueError, match="'kmajor' kind only"):
        W4GemvConfig(kind="mma", groups=1, prefetch=True)
    packed = random_packed(128, 24, 8, 64, True, torch.float16, "cpu", seed=1)
    with pytest.raises(ValueError, match="4-bit"):
        repack_k_major(packed)
    packed4 = random_packed(192, 24, 4, 64, True, torch.float16, "cpu", seed=1)
    kmajor = repack_k_major(packed4)
    assert torch.equal(dequantize_k_major(kmajor), dequantize(packed4))  # the nibble interleave is a permutation
    assert torch.equal(kmajor.zeros.t(), packed4.zeros)
    assert (kmajor.in_features, kmajor.out_features) == (packed4.in_features, packed4.out_features)


@requires_triton_device
def test_a_measured_table_entry_routes_a_layer_to_the_w4_gemv(device, tmp_path, monkeypatch):
    """kernels/quant_dispatch.py reads {"kernel": "w4_gemv", ...} entries (none shipped yet) and serves them from
    the PackedWeight as loaded; the K-major kind's entries live under K-major formats
    (tests/kernels/test_w4_kmajor_dequant.py)."""
    import json

    from tokenmill.kernels.quant_dispatch import CONFIGS_ENV, config_from_json, wna16_cuda_linear

    k, n = 256, 40
    entry = {"kernel": "w4_gemv", "kind": "mma_k", "block_n": 16, "groups": 1, "reduce": "finish"}
    table = {"cpu" if device == "cpu" else torch.cuda.get_device_name(): {"w4a16_g128": {f"{n}x{k}": {"4": entry}}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv(CONFIGS_ENV, str(path))
    packed = random_packed(k, n, 4, 128, True, torch.bfloat16, device, seed=9)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16).to(device)
    ref = wna16_linear_reference(x.float(), packed).float()
    assert rel_err(wna16_cuda_linear(x, packed, None, {}), ref) < TOL[torch.bfloat16]
    assert config_from_json({"kernel": "w4_gemv", "kind": "kmajor"}) == W4GemvConfig("kmajor")


@requires_triton_device
@pytest.mark.parametrize("rows,group,zeros,dtype", [(1, 128, True, torch.bfloat16), (3, 64, False, torch.float16),
                                                    (8, 32, True, torch.bfloat16)])
def test_kmajor_preload_matches_fp32_reference(device, rows, group, zeros, dtype):
    """The PDL variants: the first chunk loaded before the wait and peeled off the loop (one chunk, several, a
    ragged tail, with the next chunk prefetched, preload without PDL); past the first, L2 prefetches (GPU only)."""
    configs = [W4GemvConfig("kmajor", block_n=4, pdl=True, preload_steps=1),
               W4GemvConfig("kmajor", block_n=8, groups=2, pdl=True, preload_steps=1),
               W4GemvConfig("kmajor", block_n=4, groups=1, pdl=True, preload_steps=3),
               W4GemvConfig("kmajor", block_n=4, groups=2, prefetch=True, pdl=True, preload_steps=2),
               W4GemvConfig("kmajor", block_n=4, groups=2, pdl=True),
               W4GemvConfig("kmajor", block_n=4, groups=1, preload_steps=8)]
    _check(device, rows, 5 * group, 200, group, zeros, dtype, configs, seed=rows * 7 + group)


def test_pdl_fields_are_checked():
    with pytest.raises(ValueError, match="only for the 'kmajor' kind"):
        W4GemvConfig("nmajor", groups=1, preload_steps=1)
    with pytest.raises(ValueError, match="preload_steps must be 0-8"):
        W4GemvConfig("kmajor", preload_steps=9)
    with pytest.raises(ValueError, match="'kmajor' kind only"):
        W4GemvConfig("nmajor", groups=1, pdl=True)
    assert W4GemvConfig("kmajor", pdl=True, preload_steps=2).name.endswith("_pdl_pre2")
    assert W4GemvConfig("kmajor").name == "kmajor_n4_g0_w4_st2"  # today's names (table keys, results) unchanged


@pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs triton, compiled (the interpreter swaps jit functions for its own)")
@pytest.mark.parametrize("preload,pdl,act_mul,norm,residual", [
    (1, True, False, 0, False), (2, True, False, 0, False), (4, PDL_EARLY_LAUNCH, False, 0, False),
    (2, True, True, 0, False), (2, True, True, 1, False), (2, True, False, 0, True), (2, True, True, 2, False),
    (2, True, False, 0, "next_norm")])
def test_kmajor_preload_is_issued_before_the_pdl_wait(preload, pdl, act_mul, norm, residual):
    """Compiles the K-major kernel for sm_90 without a GPU: the preloaded words and scales (ld.global) and the L2
    prefetches come before griddepcontrol.wait, x's loads after it; an early launch releases the next kernel after
    the wait; nothing spills (the SiLU-and-mul, residual and next-norm epilogues and both norm prologues included)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from triton_sass import compile_sm90

    from tokenmill.kernels.w4_gemv import _kmajor_kernel

    args = dict(xp_ptr="*i32", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16",
                M="i32:1", N="i32:16", G="i32:16", stride_xm="i32:16", stride_om="i32:16", m128="i32:1", m8="i32:1",
                HAS_ZEROS=True, HAS_BIAS=False, ROWS=1, BLOCK_N=4, CHUNK_G=16, GW=16, X_BF16=True, EVEN=True,
                PREFETCH=False, PRELOAD=preload, L2_PREFETCH=preload > 1, PDL=pdl, ACT_MUL=act_mul,
                nw_ptr="*i32", eps="fp32", NORM=norm, res_ptr="*bf16", stride_resm="i32:16",
                ADD_RESIDUAL=bool(residual), sums_ptr="*fp32", next_nw_ptr="*bf16", h_ptr="*bf16", stride_hm="i32:16",
                next_sums_ptr="*fp32", zero_ptr="*fp32", NEXT_NORM=residual == "next_norm")
    info = compile_sm90(_kmajor_kernel, args, num_warps=2, keep_text=True)
    lines = info.ptx.splitlines()

    def at(pattern: str) -> list[int]:
        return [i for i, line in enumerate(lines) if pattern in line]

    (wait,) = at("griddepcontrol.wait")
    loads = at("ld.global")
    assert 0 < len([i for i in loads if i < wait]) < len(loads)  # the first chunk before, x (and the rest) after
    assert all(i < wait for i in at("prefetch.global.L2")) and (len(at("prefetch.global.L2")) > 0) == (preload > 1)
    assert [i > wait for i in at("griddepcontrol.launch_dependents")] == ([True] if pdl == PDL_EARLY_LAUNCH else [])
    assert info.spill_bytes == 0


@requires_triton_device
@pytest.mark.parametrize("rows,group,zeros,dtype,bias", [(1, 128, True, torch.bfloat16, False),
                                                         (3, 64, False, torch.float16, True),
                                                         (4, 32, True, torch.bfloat16, True)])
def test_kmajor_silu_and_mul_epilogue_equals_the_unfused_pair(device, rows, group, zeros, dtype, bias):
    """``act_mul``: the gate|up GEMV with SiLU-and-mul in its epilogue gives exactly the unfused pair's output (the
    GEMV, then kernels/activation.py's kernel), and the fp32 silu(gate) * up within the output rounding; whole tiles
    (EVEN), a ragged last tile (100 gate channels over 8-wide programs), preloads and chunks."""
    from tokenmill.kernels.activation import silu_and_mul_reference, silu_and_mul_triton

    for width, configs in ((128, [W4GemvConfig("kmajor", block_n=4), W4GemvConfig("kmajor", block_n=8, groups=2,
                                                                                  pdl=True, preload_steps=2)]),
                           (100, [W4GemvConfig("kmajor", block_n=16, groups=1, prefetch=True)])):
        packed = random_packed(5 * group, 2 * width, 4, group, zeros, dtype, device, seed=rows * 5 + width)
        gen = torch.Generator().manual_seed(rows + width)
        x = torch.randn(rows, 5 * group, generator=gen).to(dtype).to(device)
        b = torch.randn(2 * width, generator=gen).to(dtype).to(device) if bias else None
        ref = silu_and_mul_reference(wna16_linear_reference(x.float(), packed, None if b is None else b.float()))
        kmajor = repack_k_major(packed)
        for config in configs:
            fused = w4_gemv(x, kmajor, config, b, act_mul=True)
            assert fused.shape == (rows, width) and fused.dtype == dtype, config
            assert torch.equal(fused, silu_and_mul_triton(w4_gemv(x, kmajor, config, b))), config
            assert rel_err(fused, ref) < TOL[dtype], config


def test_act_mul_is_refused_where_the_kernel_has_no_epilogue():
    packed = random_packed(128, 64, 4, 128, True, torch.bfloat16, "cpu", seed=3)
    x = torch.randn(1, 128).to(torch.bfloat16)
    with pytest.raises(ValueError, match="act_mul takes the 'kmajor' kind"):
        w4_gemv(x, packed, W4GemvConfig("nmajor", groups=1), act_mul=True)
    with pytest.raises(ValueError, match="block_n >= 2"):
        w4_gemv(x, repack_k_major(packed), W4GemvConfig("kmajor", block_n=1), act_mul=True)


@requires_triton_device
@pytest.mark.parametrize("rows,group,zeros,dtype", [(1, 128, True, torch.bfloat16), (3, 64, False, torch.float16),
                                                    (2, 32, True, torch.bfloat16)])
def test_kmajor_norm_prologue_matches_the_fp32_norm_then_product(device, rows, group, zeros, dtype):
    """``norm``: the RMSNorm before the projection applied inside the K-major GEMV, against fp32 norm-then-product
    of the dequantized weight; with the SiLU-and-mul epilogue too; ragged K chunks and tiles."""
    from tokenmill.kernels.activation import silu_and_mul_reference
    from tokenmill.kernels.w4_gemv import PrologueNorm

    k, n = 5 * group, 200
    packed = random_packed(k, n, 4, group, zeros, dtype, device, seed=rows * 13 + group)
    gen = torch.Generator().manual_seed(rows * 3 + group)
    x = (3 * torch.randn(rows, k, generator=gen)).to(dtype).to(device)
    weight = (1 + 0.2 * torch.randn(k, generator=gen)).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    h32 = x.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()
    ref = wna16_linear_reference(normed, packed, bias.float()).float()
    kmajor = repack_k_major(packed)
    for config in [W4GemvConfig("kmajor", block_n=4), W4GemvConfig("kmajor", block_n=8, groups=2, prefetch=True),
                   W4GemvConfig("kmajor", block_n=4, groups=1, pdl=True, preload_steps=2)]:
        norm = PrologueNorm(weight, 1e-5)
        got = w4_gemv(x, kmajor, config, bias, norm=norm)
        assert got.shape == (rows, n) and rel_err(got, ref) < TOL[dtype], config
        act = w4_gemv(x, kmajor, config, bias, act_mul=True, norm=norm)
        assert rel_err(act, silu_and_mul_reference(ref)) < TOL[dtype], config


@requires_triton_device
@pytest.mark.parametrize("rows,dtype", [(1, torch.bfloat16), (3, torch.float16)])
def test_kmajor_residual_epilogue_is_the_norm_kernels_residual_add(device, rows, dtype):
    """``residual``: the projection plus the residual stream, rounded as the RMSNorm kernel's residual add rounds
    them (the GEMV's output, then the sum): exactly the unfused pair on CUDA; a ragged last tile."""
    packed = random_packed(256, 200, 4, 64, True, dtype, device, seed=rows)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=gen).to(dtype).to(device)
    res = torch.randn(rows, 200, generator=gen).to(dtype).to(device)
    bias = torch.randn(200, generator=gen).to(dtype).to(device)
    kmajor = repack_k_major(packed)
    for config in [W4GemvConfig("kmajor", block_n=8), W4GemvConfig("kmajor", block_n=4, pdl=True, preload_steps=2)]:
        got = w4_gemv(x, kmajor, config, bias, residual=res)
        want = w4_gemv(x, kmajor, config, bias) + res
        assert (torch.equal(got, want) if device == "cuda"
                else torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=0)), config
    with pytest.raises(ValueError, match="act_mul replaces it"):
        w4_gemv(x, kmajor, W4GemvConfig("kmajor"), residual=res, act_mul=True)


@requires_triton_device
@pytest.mark.parametrize("rows,dtype", [(1, torch.bfloat16), (3, torch.float16)])
def test_kmajor_next_norm_epilogue_feeds_the_rms_prologue(device, rows, dtype):
    """``next_norm`` + ``PrologueRms``: a residual GEMV's epilogue makes the next norm's input (the stream times
    the norm weight, the rows' sums of squares in a two-slot ring, the other slot zeroed) and the consumer GEMV
    scales by 1 / rms from it: the stream equals the plain residual epilogue's, the chain matches fp32
    norm-then-product, twice round the ring (o -> gate_up|act, down -> qkv), with a ragged last tile."""
    from tokenmill.kernels.activation import silu_and_mul_reference
    from tokenmill.kernels.gemv_epilogue import EpilogueNorm, NormSums, PrologueRms

    hidden, inter, group = 256, 192, 64
    gen = torch.Generator().manual_seed(rows + 7)
    o = random_packed(hidden, hidden, 4, group, True, dtype, device, seed=rows)
    gate_up = random_packed(hidden, 2 * inter, 4, group, True, dtype, device, seed=rows + 1)
    down = random_packed(inter, hidden, 4, group, True, dtype, device, seed=rows + 2)
    qkv = random_packed(hidden, 200, 4, group, False, dtype, device, seed=rows + 3)
    k_o, k_gu, k_down, k_qkv = map(repack_k_major, (o, gate_up, down, qkv))
    norm_w = [(1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype).to(device) for _ in range(2)]
    x = torch.randn(rows, hidden, generator=gen).to(dtype).to(device)
    residual = (3 * torch.randn(rows, hidden, generator=gen)).to(dtype).to(device)
    sums = NormSums.make(torch.device(device))
    sums.ring.fill_(5.0)  # slot 0 must start at zero (as made); slot 1 is zeroed by the first producer
    sums.ring[0].zero_()

    def normed32(stream: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        s = stream.float()
        return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.float()

    for config in [W4GemvConfig("kmajor", block_n=8), W4GemvConfig("kmajor", block_n=4, pdl=True, preload_steps=2)]:
        h = torch.empty(rows, hidden, dtype=dtype, device=device)
        stream = w4_gemv(x, k_o, config, residual=residual, next_norm=EpilogueNorm(norm_w[0], h, sums, 0))
        assert torch.equal(stream, w4_gemv(x, k_o, config, residual=residual)), config
        assert torch.all(sums.ring[1, :rows] == 0)  # the other slot, zeroed for the next producer
        assert torch.allclose(sums.ring[0, :rows], stream.float().pow(2).sum(-1), rtol=1e-5, atol=0)
        assert rel_err(h, stream.float() * norm_w[0].float()) < TOL[dtype]
        act = w4_gemv(h, k_gu, config, act_mul=True, norm=PrologueRms(1e-5, sums, 0))
        want = silu_and_mul_reference(wna16_linear_reference(normed32(stream, norm_w[0]), gate_up).float())
        assert rel_err(act, want) < TOL[dtype], config
        h2 = torch.empty_like(h)
        stream2 = w4_gemv(act, k_down, config, residual=stream, next_norm=EpilogueNorm(norm_w[1], h2, sums, 1))
        assert torch.all(sums.ring[0, :rows] == 0)  # slot 0 zero again for the next layer's o producer
        got = w4_gemv(h2, k_qkv, config, norm=PrologueRms(1e-5, sums, 1))
        assert rel_err(got, wna16_linear_reference(normed32(stream2, norm_w[1]), qkv).float()) < TOL[dtype], config
    with pytest.raises(ValueError, match="pass residual too"):
        w4_gemv(x, k_o, W4GemvConfig("kmajor"), next_norm=EpilogueNorm(norm_w[0], h, sums, 0))
