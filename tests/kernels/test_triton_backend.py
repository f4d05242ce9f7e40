"""TritonAttentionBackend against TorchAttentionBackend (the reference) on mixed, prefix-cached and decode
batches, plus CUDA-graph capture and replay of a decode step. Skips without CUDA + triton.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_paged_batch, rel_err, requires_cuda, requires_triton_device

from tokenmill.attention.backend import get_attention_backend
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.intmath import cdiv

TOL = 1e-2

BATCHES = {
    "prefill": [(0, 37), (0, 128), (0, 1)],
    "prefix_and_chunks": [(48, 16), (100, 77), (3, 5)],
    "mixed": [(0, 20), (63, 1), (200, 1), (31, 40)],
    "decode": [(0, 1), (15, 1), (16, 1), (511, 1), (1200, 1)],
    "decodes_first": [(63, 1), (200, 1), (0, 1), (0, 20), (31, 40), (5, 1)],
    # 1 + k new tokens each (speculative verification): the decode kernel, causal among the new tokens.
    "verification": [(10, 4), (0, 4), (100, 4), (33, 4)],
}


def _backend():
    from tokenmill.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend()


@requires_triton_device
@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
@pytest.mark.parametrize("batch", list(BATCHES))
def test_backend_matches_torch_reference(device, dtype, batch):
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter mis-computes bf16 tl.dot")
    seqs = BATCHES[batch]
    query, key, value, cache, meta = make_paged_batch(seqs, 8, 2, 64, 16, dtype, device, seed=len(seqs))
    assert meta.is_decode_only == (batch == "decode")
    # The reference runs on an fp32, NaN-free copy: its batched decode path reads (and masks) slots past
    # seq_len, and 0 * NaN would poison it. The Triton backend keeps the NaN-poisoned cache, so any read
    # of an unwritten slot by our kernels still shows.
    ref_cache = cache.float().nan_to_num(nan=0.0)
    ref = TorchAttentionBackend().forward(query.float(), key.float(), value.float(), ref_cache, meta, 0.125)
    backend = _backend()
    if batch == "verification":  # 1 + k rows take the decode kernel once graphs for that length exist
        backend.graph_buffers(4, 8, 16, meta.decode_query_len, device)
    out = backend.forward(query, key, value, cache, meta, 0.125)
    assert out.shape == query.shape and out.dtype == dtype
    assert rel_err(out, ref) <= (1e-4 if dtype == torch.float32 else TOL)
    # The backend wrote this step's keys/values exactly where the reference did.
    torch.testing.assert_close(cache.float().nan_to_num(nan=0.0), ref_cache, rtol=0, atol=0)


@requires_triton_device
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_backend_with_rotary_matches_rotating_first(device, dtype, batch):
    """The model hands the backend unrotated q/k plus (positions, cos_sin): decode-only steps rotate inside
    the decode kernel, mixed steps in the fused KV write; both must equal rotating first, then attending."""
    from tokenmill.kernels.rotary import apply_rotary_reference, build_cos_sin_cache, rope_inv_freq

    seqs = BATCHES[batch]
    query, key, value, cache, meta = make_paged_batch(seqs, 8, 2, 64, 16, dtype, device, seed=7)
    positions = torch.tensor([ctx + i for ctx, n in seqs for i in range(n)], device=device)
    cos_sin = build_cos_sin_cache(rope_inv_freq(64, 10000.0), 2048).to(device)
    q_ref, k_ref = query.float().clone(), key.float().clone()
    apply_rotary_reference(q_ref, k_ref, positions, cos_sin)
    ref_cache = cache.float().nan_to_num(nan=0.0)
    ref = TorchAttentionBackend().forward(q_ref, k_ref, value.float(), ref_cache, meta, 0.125)
    out = _backend().forward(query, key, value, cache, meta, 0.125, (positions, cos_sin))
    assert rel_err(out, ref) <= (1e-4 if dtype == torch.float32 else TOL)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(cache.float().nan_to_num(nan=0.0), ref_cache, rtol=tol, atol=tol)

@requires_cuda
def test_auto_backend_on_cuda_is_triton():
    assert get_attention_backend("auto", "cuda").name == "triton"


@requires_cuda
def test_decode_step_replays_in_cuda_graph():
    """Capture with one batch's lengths, replay with grown ones: the graph must read lengths from device."""
    device, dtype, block_size, width = "cuda", torch.bfloat16, 16, 64  # width: max blocks per sequence
    seqs = [(40, 1), (300, 1), (7, 1), (0, 1)]
    query, key, value, cache, meta = make_paged_batch(
        seqs, 8, 2, 128, block_size, dtype, device, seed=11, spare_blocks=200
    )
    tables = meta.block_tables.tolist()
    static_meta = AttentionMetadata.build(
        [1] * 4,
        meta.seq_lens_cpu,
        [t[: cdiv(s, block_size)] for t, s in zip(tables, meta.seq_lens_cpu, strict=True)],
        block_size,
        device,
        pad_blocks_to=width,
    )
    backend = _backend()
    static_q, static_k, static_v = query.clone(), key.clone(), value.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        backend.forward(static_q, static_k, static_v, cache, static_meta, 0.1)  # warm-up compiles kernels
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = backend.forward(static_q, static_k, static_v, cache, static_meta, 0.1)

    # Next step: every sequence grows by one token; new inputs copied into the captured buffers.
    gen = torch.Generator(device=device).manual_seed(5)
    new_lens = [n + 1 for n in meta.seq_lens_cpu]
    num_free = list(range(cache.shape[1]))
    used = {b for t in tables for b in t}
    free = [b for b in num_free if b not in used]
    new_tables = []
    for t, n in zip(tables, new_lens, strict=True):
        need = cdiv(n, block_size)
        t = list(t[: cdiv(n - 1, block_size)])
        while len(t) < need:
            t.append(free.pop())
        new_tables.append(t)
    step = AttentionMetadata.build([1] * 4, new_lens, new_tables, block_size, device, pad_blocks_to=width)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        getattr(static_meta, name).copy_(getattr(step, name))
    for buf in (static_q, static_k, static_v):
        buf.copy_(torch.randn(buf.shape, generator=gen, device=device).to(dtype))
    ref_cache = cache.float().nan_to_num(nan=0.0)  # see test_backend_matches_torch_reference
    graph.replay()
    ref = TorchAttentionBackend().forward(
        static_q.float(), static_k.float(), static_v.float(), ref_cache, step, 0.1
    )
    torch.cuda.synchronize()
    assert rel_err(static_out, ref) <= TOL
