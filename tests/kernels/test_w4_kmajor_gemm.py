"""The tensor-core W4A16 GEMM on the K-major layout (kernels/w4_kmajor_gemm.py) against the fp32 product with the
dequantized weight, on fresh random codes, scales, zero points (integer and fractional), activations and bias:
one product a K step (x loaded in runs and reordered, or gathered; codes scaled before the product or
the product after) and one a nibble position, odd row counts and widths (partial tiles), groups 32/64/128,
K split over programs, bf16 and fp16; the same for the transposed product (``w_lhs``: weight codes as the left
operand, x^T gathered in runs as the right) at groups 16 (two words a step) to 128. Runs on CUDA, or on CPU under
TRITON_INTERPRET=1 (there bf16 products go in as fp32: kernels/splitk.py's dot_in_fp32, the interpreter's bf16
tl.dot multiplies raw storage)."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, requires_cuda, requires_triton_device
from test_wna16_gemm import random_packed

from tokenmill.kernels.w4_gemv import repack_k_major
from tokenmill.kernels.w4_kmajor_gemm import KMajorGemmConfig, w4_kmajor_gemm
from tokenmill.kernels.w4_kmajor_gluon import HAS_GLUON, code_columns, code_words
from tokenmill.kernels.w4_kmajor_gluon_ring import ring_block_k, ring_code_words
from tokenmill.kernels.wna16_gemm import wna16_linear_reference

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3}  # output rounding: bf16 ~3e-3, fp16 ~3e-4 relative


def _check(device, rows, k, n, group, zeros, dtype, configs, seed, fractional_zeros=False):
    packed = random_packed(k, n, 4, group, zeros, dtype, device, seed=seed)
    if fractional_zeros:  # float zero points (the kernel applies them in fp32, never rounded to the magic's grid)
        gen = torch.Generator().manual_seed(seed + 2)
        packed = dataclasses.replace(packed, zeros=(torch.rand(packed.scales.shape, generator=gen) * 15).to(dtype)
                                     .to(device))
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    ref = wna16_linear_reference(x.float(), packed, bias.float()).float()
    weight = repack_k_major(packed)
    for config in configs:
        first = w4_kmajor_gemm(x, weight, config, bias)
        again = w4_kmajor_gemm(x, weight, config, bias)  # the split-K counters were left at zero
        assert first.dtype == dtype and first.shape == (rows, n), config
        assert rel_err(first, ref) < TOL[dtype], (config, rel_err(first, ref))
        assert torch.equal(first, again), config  # partials summed in split order: deterministic
    no_bias = w4_kmajor_gemm(x, weight, configs[0])
    assert rel_err(no_bias, wna16_linear_reference(x.float(), packed).float()) < TOL[dtype]


@requires_triton_device
@pytest.mark.parametrize("rows,zeros,dtype", [(8, True, torch.float16), (37, False, torch.float16),
                                              (16, True, torch.bfloat16), (70, False, torch.bfloat16)])
def test_group128_matches_fp32_reference(device, rows, zeros, dtype):
    """Three groups of K (a split with one step fewer than the others) and 72 channels (partial tiles)."""
    configs = [KMajorGemmConfig(16, 32, 128, split_k=2), KMajorGemmConfig(32, 16, 64, split_k=4, x_runs=False),
               KMajorGemmConfig(16, 64, 128, split_k=2, one_dot=False, x_runs=False),
               KMajorGemmConfig(64, 32, 64, scale_codes=True), KMajorGemmConfig(16, 16, 128, 3, scale_codes=True,
                                                                                 x_runs=False)]
    _check(device, rows, 3 * 128, 72, 128, zeros, dtype, configs, seed=rows * 7 + zeros)


@requires_triton_device
@pytest.mark.parametrize("group,dtype", [(32, torch.float16), (64, torch.bfloat16)])
def test_small_groups_and_fractional_zeros(device, group, dtype):
    """block_k capped at a group of 32 / 64 (one scale a step); float zero points off the integer grid."""
    configs = [KMajorGemmConfig(16, 32, 128, split_k=3), KMajorGemmConfig(32, 64, 32, x_runs=False),
               KMajorGemmConfig(16, 32, 128, scale_codes=True)]
    _check(device, 21, 5 * group, 40, group, True, dtype, configs, seed=group, fractional_zeros=True)


def w_lhs(m: int, n: int, k: int, split: int = 1, sc: bool = False) -> KMajorGemmConfig:
    return KMajorGemmConfig(m, n, k, split, x_runs=False, scale_codes=sc, w_lhs=True)


@requires_triton_device
@pytest.mark.parametrize("rows,group,zeros,dtype", [(37, 128, True, torch.float16), (16, 128, False, torch.bfloat16),
                                                    (70, 64, True, torch.bfloat16), (9, 16, True, torch.float16),
                                                    (21, 32, False, torch.float16)])
def test_w_lhs_matches_fp32_reference(device, rows, group, zeros, dtype):
    """The transposed product: codes as the left operand (nibbles of a lane's words in the tensor-core fragment's
    column order), x^T as the right; partial tiles both ways, a split with one step fewer, steps capped at the group,
    the product scaled after (one partial a step) or the codes before."""
    configs = [w_lhs(16, 32, 128, split=2), w_lhs(32, 64, 64, split=3, sc=True), w_lhs(64, 16, 32),
               w_lhs(16, 64, 128, sc=True)]
    _check(device, rows, 3 * 128, 72, group, zeros, dtype, configs, seed=rows * 11 + group,
           fractional_zeros=zeros and group < 128)


@pytest.mark.parametrize("group,block_k", [(128, 128), (128, 64), (32, 32), (16, 16)])
def test_gluon_code_order_reads_the_words_it_multiplies(group, block_k):
    """kernels/w4_kmajor_gluon.py's column order (the formulas its kernel inlines) on CPU, in torch: code column c
    takes nibble code_words(c) of the step's words and multiplies x column code_columns(c); over every step of K
    that is the product with the dequantized weight (Triton's interpreter does not run Gluon)."""
    k, n, rows = 2 * max(group, 128), 24, 5
    packed = random_packed(k, n, 4, group, True, torch.float16, "cpu", seed=group + block_k)
    weight = repack_k_major(packed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(block_k)).double()
    word, nibble = code_words(block_k)
    cols = code_columns(block_k, group // 8)
    assert sorted(cols.tolist()) == list(range(block_k)) or block_k < group  # a step's columns, each once
    out = torch.zeros(rows, n, dtype=torch.float64)
    kw, gw = block_k // 8, group // 8
    for step in range(k // block_k):
        g, sub = divmod(step * kw, gw)
        words = weight.qweight[:, step * kw + word]  # [n, c]
        codes = ((words >> (4 * nibble)) & 0xF).double()
        zero, scale = weight.zeros[:, g].double(), weight.scales[:, g].double()
        w = (codes - zero[:, None]) * scale[:, None]
        out += x[:, g * group + 2 * sub + cols] @ w.t()
    ref = wna16_linear_reference(x.float(), packed).double()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.skipif(not HAS_GLUON or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs triton's Gluon, compiled (the interpreter swaps jit functions for its own)")
@pytest.mark.parametrize("config,group", [(w_lhs(64, 128, 128, 2), 128), (w_lhs(16, 64, 32), 32)])
def test_gluon_kernel_builds_codes_in_the_operand_layout(config, group):
    """Compiles the Gluon kernel for sm_90 without a GPU: the codes' reshape into the wgmma A operand must be a
    trivial layout conversion (the kernel asserts it at compile time), and nothing spills."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from triton_sass import compile_sm90

    from tokenmill.kernels.w4_kmajor_gluon import _kmajor_gemm_gluon_kernel

    config = dataclasses.replace(config, gluon=True, num_warps=4 if config.block_n == 64 else 8)
    block_k = min(config.block_k, group)
    args = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16",
                part_ptr="*fp32", cnt_ptr="*i32", M="i32:1", N="i32:16", K="i32:16", stride_xm="i32:16",
                stride_wn="i32:16", stride_om="i32:16", HAS_ZEROS=True, HAS_BIAS=True, SPLIT_K=config.split_k,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, GW=group // 8,
                TW=min(4, block_k // 8), MAGIC_BITS=0x4300, MAGIC=128.0, WARPS=config.num_warps)
    info = compile_sm90(_kmajor_gemm_gluon_kernel, args, num_warps=config.num_warps, gluon=True)
    assert info.spill_bytes == 0 and info.loops


@requires_cuda
@pytest.mark.parametrize("rows,group,zeros,dtype", [(37, 128, True, torch.bfloat16), (200, 128, False, torch.float16),
                                                    (16, 32, True, torch.bfloat16), (9, 16, True, torch.float16)])
def test_gluon_w_lhs_matches_fp32_reference(rows, group, zeros, dtype):
    """The Gluon kernel (CUDA only): partial tiles both ways, K split with an uneven last split, bias."""
    configs = [dataclasses.replace(w_lhs(16, 64, 128, split=3), gluon=True),
               dataclasses.replace(w_lhs(64, 128, 64, split=2), gluon=True, num_warps=8)]
    _check("cuda", rows, 3 * 128, 200, group, zeros, dtype, configs, seed=rows + group,
           fractional_zeros=zeros and group < 128)


@pytest.mark.parametrize("group,block_k", [(128, 128), (128, 64), (128, 32), (64, 64), (32, 32), (256, 128)])
def test_ring_code_order_reads_the_words_it_multiplies(group, block_k):
    """kernels/w4_kmajor_gluon_ring.py's natural K order on CPU, in torch: code column c of sub-step s of a group
    takes nibble ring_code_words(c) of the group's words and multiplies x column step * block_k + c."""
    k, n, rows = 2 * max(group, 128), 24, 5
    packed = random_packed(k, n, 4, group, True, torch.float16, "cpu", seed=group + block_k + 1)
    weight = repack_k_major(packed)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(block_k + 1)).double()
    step_k = ring_block_k(block_k, group)
    out = torch.zeros(rows, n, dtype=torch.float64)
    for step in range(k // step_k):
        g, sub = divmod(step * step_k, group)
        word, nibble = ring_code_words(step_k, group, sub // step_k)
        words = weight.qweight[:, g * (group // 8) + word]  # [n, c]
        codes = ((words >> (4 * nibble)) & 0xF).double()
        w = (codes - weight.zeros[:, g, None].double()) * weight.scales[:, g, None].double()
        out += x[:, step * step_k:(step + 1) * step_k] @ w.t()
    assert rel_err(out, wna16_linear_reference(x.float(), packed).double()) < 1e-5


def test_ring_block_k_caps_and_rejects():
    assert ring_block_k(128, 128) == 128 and ring_block_k(256, 64) == 64 and ring_block_k(16, 128) == 32
    with pytest.raises(ValueError, match="multiple of 32"):
        ring_block_k(64, 16)


def ring(m: int, n: int, k: int, split: int = 1, warps: int = 8, stages: int = 4,
         weight_ring: bool = False, pair: bool = False, register_a: bool = False,
         finish: int = 0) -> KMajorGemmConfig:
    return KMajorGemmConfig(m, n, k, split, num_warps=warps, num_stages=stages, x_runs=False, w_lhs=True,
                            gluon=True, pipelined=True, weight_ring=weight_ring or register_a, pair_dequant=pair,
                            register_a=register_a, finish_rows=finish)


@pytest.mark.skipif(not HAS_GLUON or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs triton's Gluon, compiled (the interpreter swaps jit functions for its own)")
@pytest.mark.parametrize("config,group", [(ring(128, 128, 128), 128), (ring(64, 128, 64, 2, stages=3), 128),
                                          (ring(64, 64, 32, warps=4), 32),
                                          (ring(64, 128, 128, 2, weight_ring=True), 128),
                                          (ring(256, 128, 64, stages=3, weight_ring=True), 64),
                                          (ring(64, 128, 128, 2, weight_ring=True, pair=True), 128),
                                          (ring(64, 128, 128, pair=True, register_a=True), 128),
                                          (ring(64, 128, 128, 8, pair=True, register_a=True), 128),
                                          (ring(64, 64, 64, 2, warps=4, register_a=True), 32),
                                          (ring(128, 128, 128, 2, pair=True, register_a=True, finish=32), 128),
                                          (ring(256, 128, 64, 4, pair=True, register_a=True, finish=32), 64)])
def test_gluon_ring_kernel_compiles_async(config, group):
    """Compiles the pipelined kernel for sm_90 without a GPU: the codes' reshape into the wgmma operand layout is
    trivial (asserted at compile time), nothing spills, the K loop keeps one product in flight (wgmma wait 1),
    x arrives by cp.async and both operands are read from shared memory (the codes stored by stmatrix); with
    weight_ring the words come by cp.async too and are read from shared memory (no global load of words in the
    loop: the scales' and zero points' two remain); with register_a no codes are stored and ptxas writes no
    in-flight product's A registers; with pair_dequant (bf16 and fp16) Triton hands each asm instance one byte's
    two codes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from triton_sass import compile_sm90, wgmma_operand_hazards

    from tokenmill.kernels.w4_kmajor_gluon_ring import _kmajor_gemm_gluon_ring_kernel

    args = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", b_ptr="*bf16", out_ptr="*bf16",
                part_ptr="*fp32", cnt_ptr="*i32", M="i32:1", N="i32:16", K="i32:16", stride_xm="i32:16",
                stride_wn="i32:16", stride_om="i32:16", HAS_ZEROS=True, HAS_BIAS=True, SPLIT_K=config.split_k,
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=ring_block_k(config.block_k, group),
                GW=group // 8, STAGES=config.num_stages, WARPS=config.num_warps, W_RING=config.weight_ring,
                PACKED=config.pair_dequant, A_REGS=config.register_a, FINISH_ROWS=config.finish_rows)
    info = compile_sm90(_kmajor_gemm_gluon_ring_kernel, args, num_warps=config.num_warps, gluon=True,
                        keep_text=True)
    assert info.spill_bytes == 0 and info.loops
    assert "wgmma.wait_group.sync.aligned 1" in info.ptx and "cp.async" in info.ptx
    loop = info.loops[-1]["opcodes"]
    assert loop.get("HGMMA") and loop.get("LDGSTS") and bool(loop.get("STSM")) != config.register_a
    if config.register_a:  # ptxas keeps each in-flight product's A registers (the two steps' sets apart)
        label = re.search(r"^\s*(\.L_x_\d+):(?:(?!^\s*\.L_x_).)*HGMMA", info.sass, re.M | re.S).group(1)
        assert wgmma_operand_hazards(info.sass, label) == []
    if config.weight_ring:  # the words read from shared memory (lds / ldmatrix), only scales / zeros from global
        assert loop.get("LDS", 0) + loop.get("LDSM", 0) and loop.get("LDG", 0) <= 4 * (1 + config.register_a)
    else:
        assert not loop.get("LDSM")
    if config.pair_dequant:  # two codes a bf16x2 subtract and multiply, no fp32 arithmetic on the codes
        assert loop.get("HMUL2") and loop.get("HADD2") and not loop.get("FFMA") and not loop.get("F2FP")
        # each asm instance gets one byte's two codes: the same word, shifts 8 p and 8 p + 4 (its PTX comment
        # names both elements' operands), which is what the asm assumes when it reads only the first's
        fp16_args = {**args, **dict.fromkeys(("x_ptr", "s_ptr", "z_ptr", "b_ptr", "out_ptr"), "*fp16")}
        half = compile_sm90(_kmajor_gemm_gluon_ring_kernel, fp16_args, num_warps=config.num_warps, gluon=True,
                            keep_text=True)
        assert "sub.rn.f16x2" in half.ptx and "sub.rn.bf16x2" in info.ptx
        per_step = config.block_n * ring_block_k(config.block_k, group) // (2 * 32 * config.num_warps)
        for ptx in (info.ptx, half.ptx):
            consts = {r: int(v) for r, v in re.findall(r"mov\.b32\s+(%r\d+),\s*(\d+);", ptx)}
            pairs = re.findall(r"// pair (%r\d+) (%r\d+) (%r\d+) (%r\d+)", ptx)
            assert pairs and len(pairs) % per_step == 0  # a step's pairs a thread, once per inlined step
            for w0, w1, s0, s1 in pairs:
                assert w0 == w1 and consts[s0] % 8 == 0 and consts[s1] == consts[s0] + 4, (w0, w1, s0, s1)


@requires_cuda
@pytest.mark.parametrize("rows,group,zeros,dtype", [(37, 128, True, torch.bfloat16), (200, 128, False, torch.float16),
                                                    (256, 64, True, torch.bfloat16), (70, 32, True, torch.float16)])
def test_gluon_ring_matches_fp32_reference(rows, group, zeros, dtype):
    """The pipelined Gluon kernel (CUDA only): partial tiles both ways (200 channels, odd rows), K split with an
    uneven last split, steps of a quarter, half or a whole group, ring depths 3-5, 4 and 8 warps, bias."""
    configs = [ring(64, 128, 128, split=3), ring(128, 128, 64, stages=3), ring(256, 128, 32, split=2, stages=5),
               ring(64, 64, 128, warps=4), ring(64, 128, 128, split=3, weight_ring=True),
               ring(128, 128, 64, stages=3, weight_ring=True), ring(256, 64, 32, split=2, warps=4, stages=5,
                                                                    weight_ring=True),
               ring(64, 128, 128, split=3, weight_ring=True, pair=True), ring(128, 64, 64, warps=4, pair=True),
               ring(64, 128, 128, split=3, pair=True, register_a=True), ring(256, 64, 32, warps=4, register_a=True),
               ring(128, 128, 128, split=2, pair=True, register_a=True, finish=32),
               ring(256, 128, 64, split=3, weight_ring=True, finish=64), ring(64, 64, 32, 2, warps=4, finish=32)]
    _check("cuda", rows, 8 * 128, 200, group, zeros, dtype, configs, seed=rows + group + 5,
           fractional_zeros=zeros and group < 128)


@requires_triton_device
def test_launcher_rejects_what_the_kernel_cannot_serve(device):
    packed = random_packed(192, 32, 4, 64, True, torch.float16, device, seed=3)
    x = torch.randn(9, 192).to(torch.float16).to(device)
    with pytest.raises(ValueError, match="takes a KMajorWeight"):
        w4_kmajor_gemm(x, packed)
    with pytest.raises(ValueError, match="group size >= 128"):
        w4_kmajor_gemm(x, repack_k_major(packed), KMajorGemmConfig(one_dot=False, x_runs=False))
    with pytest.raises(ValueError, match=r"x \[M, 192\]"):
        w4_kmajor_gemm(x[:, :64], repack_k_major(packed))
    assert w4_kmajor_gemm(x[:0], repack_k_major(packed)).shape == (0, 32)


def test_config_validation():
    with pytest.raises(ValueError, match="block_m must be a power of two >= 16"):
        KMajorGemmConfig(block_m=8)
    with pytest.raises(ValueError, match="block_n must be"):
        KMajorGemmConfig(block_n=48)
    with pytest.raises(ValueError, match="one_dot=False needs block_k >= 128"):
        KMajorGemmConfig(block_k=64, one_dot=False)
    with pytest.raises(ValueError, match="x_runs=True is a variant of one_dot=True"):
        KMajorGemmConfig(one_dot=False)
    with pytest.raises(ValueError, match="scale_codes=True is a variant of one_dot=True"):
        KMajorGemmConfig(one_dot=False, x_runs=False, scale_codes=True)
    with pytest.raises(ValueError, match="split_k"):
        KMajorGemmConfig(split_k=0)
    with pytest.raises(ValueError, match="w_lhs=True takes one_dot=True, x_runs=False"):
        KMajorGemmConfig(w_lhs=True)
    with pytest.raises(ValueError, match="w_lhs=True takes one_dot=True, x_runs=False"):
        KMajorGemmConfig(one_dot=False, x_runs=False, w_lhs=True)
    assert w_lhs(64, 128, 64, 2, sc=True).name == "kmgemm_wl_sc_m64_n128_k64_s2_w4_st3"
    with pytest.raises(ValueError, match="gluon=True is the w_lhs=True product"):
        KMajorGemmConfig(gluon=True)
    with pytest.raises(ValueError, match="gluon=True is the w_lhs=True product"):
        KMajorGemmConfig(x_runs=False, w_lhs=True, scale_codes=True, gluon=True)
    with pytest.raises(ValueError, match="pipelined=True is a gluon=True variant"):
        KMajorGemmConfig(x_runs=False, w_lhs=True, pipelined=True)
    with pytest.raises(ValueError, match="weight_ring=True is a pipelined=True variant"):
        KMajorGemmConfig(x_runs=False, w_lhs=True, gluon=True, weight_ring=True)
    with pytest.raises(ValueError, match="pair_dequant=True is a pipelined=True variant"):
        KMajorGemmConfig(x_runs=False, w_lhs=True, gluon=True, pair_dequant=True)
    with pytest.raises(ValueError, match="finish_rows is a pipelined=True variant"):
        KMajorGemmConfig(x_runs=False, w_lhs=True, gluon=True, finish_rows=32)
    for rows in (16, 48, 256):  # under a warp's lanes, not a power of two, not dividing block_n 128
        with pytest.raises(ValueError, match="finish_rows"):
            ring(64, 128, 128, 2, finish=rows)
    assert ring(64, 128, 128, 2, finish=32).name == "kmgemm_wlgp_m64_n128_k128_s2_w8_st4_f32"
    assert ring(64, 128, 128, 2).name == "kmgemm_wlgp_m64_n128_k128_s2_w8_st4"
    assert ring(64, 128, 128, 2, weight_ring=True, pair=True).name == "kmgemm_wlgpw2_m64_n128_k128_s2_w8_st4"
    with pytest.raises(ValueError, match="register_a=True is a weight_ring=True variant"):
        KMajorGemmConfig(x_runs=False, w_lhs=True, gluon=True, pipelined=True, register_a=True)
    with pytest.raises(ValueError, match="pipelined=True is a gluon=True variant"):
        KMajorGemmConfig(x_runs=False, w_lhs=True, gluon=True, pipelined=True, num_stages=2)
    assert ring(128, 128, 128).name == "kmgemm_wlgp_m128_n128_k128_s1_w8_st4"
    with pytest.raises(ValueError, match="block_n a multiple of 16 x num_warps"):
        KMajorGemmConfig(16, 64, x_runs=False, w_lhs=True, gluon=True, num_warps=8)
    gl_config = KMajorGemmConfig(64, 128, 128, 2, num_warps=8, x_runs=False, w_lhs=True, gluon=True)
    assert gl_config.name == "kmgemm_wlg_m64_n128_k128_s2_w8_st3"
    assert KMajorGemmConfig(64, 128, 128, 2, False, 8, 4, False).name == "kmgemm_j_m64_n128_k128_s2_w8_st4"
    assert KMajorGemmConfig(16, 64, 64).name == "kmgemm_r_m16_n64_k64_s1_w4_st3"
    assert KMajorGemmConfig(128, scale_codes=True).name == "kmgemm_r_sc_m128_n64_k128_s1_w4_st3"


def test_integer_zero_points_picks_the_pair_dequant_path():
    """pair_dequant's exact bf16 subtraction needs integer zero points: symmetric, GPTQ / AWQ (integers stored as
    floats) qualify, GGUF Q4_1-like fractional ones do not (the kernel then keeps the fp32 path)."""
    from tokenmill.kernels.w4_gemv import integer_zero_points

    assert integer_zero_points(None)
    assert integer_zero_points(torch.tensor([[0.0, 8.0], [15.0, 16.0]], dtype=torch.bfloat16))
    assert not integer_zero_points(torch.tensor([[0.0, 7.5]]))
    assert not integer_zero_points(torch.tensor([[200.0]]))
    packed = random_packed(256, 16, 4, 128, True, torch.bfloat16, "cpu", seed=4)
    assert repack_k_major(packed).integer_zeros == integer_zero_points(packed.zeros)
