"""Programmatic dependent launch: a decode layer's kernel chain gives the same bits with and without it,
eagerly and replayed from a CUDA graph (a kernel that read its input before the producer finished would not)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_paged_batch, requires_cuda

from tokenmill.kernels._triton import use_pdl
from tokenmill.kernels.paged_attention import paged_decode, plan_decode
from tokenmill.kernels.rms_norm import rms_norm_triton
from tokenmill.kernels.rotary_kv_write import rotary_and_cache
from tokenmill.kernels.tiled_gemm import SKINNY_CANDIDATES, tiled_linear
from tokenmill.model.layers import rope_cos_sin_cache


def test_pdl_is_off_for_cpu_tensors_and_when_refused():
    assert use_pdl(torch.zeros(1)) is False
    if torch.cuda.is_available():
        assert use_pdl(torch.zeros(1, device="cuda"), requested=False) is False


def _layer_chain(inputs: dict[str, torch.Tensor], pdl: bool) -> torch.Tensor:
    """rms_norm -> qkv (tiled) -> rotary + cache write -> paged decode -> o (tiled) -> add + rms_norm ->
    gate_up (cuBLAS, never PDL) -> fused SiLU-and-mul down (tiled)."""
    h, w = inputs["hidden"], inputs
    x = rms_norm_triton(h, w["norm"], 1e-5, pdl=pdl)
    qkv = tiled_linear(x, w["qkv"], None, SKINNY_CANDIDATES[1], pdl=pdl)
    q, k, v = qkv.split([8 * 64, 2 * 64, 2 * 64], dim=-1)
    q, k, v = q.view(-1, 8, 64), k.view(-1, 2, 64), v.view(-1, 2, 64)
    rotary_and_cache(q, k, v, w["positions"], w["cos_sin"], w["cache"], w["slots"], pdl=pdl)
    attn = paged_decode(q, w["cache"], w["block_tables"], w["seq_lens"], 0.125, plan=w["plan"], pdl=pdl)
    o = tiled_linear(attn.reshape(-1, 8 * 64), w["o"], None, SKINNY_CANDIDATES[0], pdl=pdl)
    x, residual = rms_norm_triton(o, w["norm"], 1e-5, residual=h, pdl=pdl)
    gate_up = F.linear(x, w["gate_up"])
    return tiled_linear(gate_up, w["down"], None, SKINNY_CANDIDATES[2], gated=True, pdl=pdl) + residual


@requires_cuda
def test_decode_chain_gives_the_same_bits_with_programmatic_launch():
    if not use_pdl(torch.zeros(1, device="cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    seq_lens = [37, 300, 5, 129]
    _, _, _, cache, meta = make_paged_batch([(n - 1, 1) for n in seq_lens], 8, 2, 64, 16, torch.bfloat16, "cuda", seed=5)
    gen = torch.Generator(device="cuda").manual_seed(11)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    inputs = {
        "hidden": rand(4, 512), "norm": rand(512), "qkv": rand(768, 512, scale=512**-0.5),
        "o": rand(512, 512, scale=512**-0.5), "gate_up": rand(2048, 512, scale=512**-0.5),
        "down": rand(512, 1024, scale=1024**-0.5), "positions": (meta.seq_lens - 1).long(),
        "cos_sin": rope_cos_sin_cache(64, 10000.0, None, 4096).cuda(), "cache": cache, "slots": meta.slot_mapping,
        "block_tables": meta.block_tables, "seq_lens": meta.seq_lens,
        "plan": plan_decode(4, 2, meta.block_tables.shape[1] * 16, 132, min_partition=64),
    }
    assert inputs["plan"].num_splits > 1  # the split + reduce pair is in the chain
    pristine = cache.clone()
    expected = _layer_chain(inputs, pdl=False)
    cache.copy_(pristine)
    assert torch.equal(_layer_chain(inputs, pdl=True), expected)

    graph = torch.cuda.CUDAGraph()
    cache.copy_(pristine)
    _layer_chain(inputs, pdl=True)  # warm-up outside capture (compiles the PDL variants)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        out = _layer_chain(inputs, pdl=True)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        cache.copy_(pristine)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
