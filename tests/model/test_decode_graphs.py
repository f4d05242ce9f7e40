"""Decode CUDA graphs of (batch, 1 + k) shapes on a tiny random Llama: a verification step of k draft tokens
replayed from the graph gives the logits of feeding those tokens one decode step at a time, and plain
one-token graphs still match the eager forward. The graphs read the attention backend's own buffers.

On CPU the same DecodeGraphs stages a step and "replays" by running the captured forward eagerly on its
buffers (no CUDA graph), which checks the staging, padding and output slicing with the torch backend."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention.kv_cache import KVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.config import KVCacheSpec
from tokenmill.kernels._triton import HAS_TRITON

requires_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA + triton")

BLOCK = 16
CONTEXTS = [20, 5, 41]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _setup(device: str):
    from tokenmill.attention.backend import get_attention_backend
    from tokenmill.model.loader import build_model, init_random_weights
    from tokenmill.model.presets import preset_spec

    spec = preset_spec("tiny-llama")
    model = build_model(spec, get_attention_backend("auto", device), torch.float32, device)
    init_random_weights(model, seed=0)
    kv_spec = KVCacheSpec(BLOCK, spec.num_kv_heads, spec.head_dim, torch.float32)
    caches = KVCache(kv_spec, spec.num_layers, 40, device)
    tables = [[3, 9, 4, 30], [7, 1, 2, 5], [11, 12, 20, 21]]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=gen) for n in CONTEXTS]
    meta = AttentionMetadata.build(CONTEXTS, CONTEXTS, tables, BLOCK, device)
    with torch.inference_mode():
        model(torch.cat(prompts).to(device), torch.cat([torch.arange(n) for n in CONTEXTS]).to(device), caches, meta)
    return model, caches, tables, spec.vocab_size


def _clone(caches: KVCache) -> KVCache:
    copy = KVCache(caches.spec, len(caches), caches.num_blocks, caches[0].kv.device)
    for dst, src in zip(copy, caches, strict=True):
        dst.kv.copy_(src.kv)
    return copy


def _step(tables, query_len: int, vocab: int, seed: int, device: str):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (len(CONTEXTS) * query_len,), generator=gen).to(device)
    positions = torch.cat([torch.arange(n, n + query_len) for n in CONTEXTS]).to(device)
    seq_lens = [n + query_len for n in CONTEXTS]
    meta = AttentionMetadata.build([query_len] * len(CONTEXTS), seq_lens, tables, BLOCK, device, pad_blocks_to=4)
    return ids, positions, meta


class _EagerReplay:
    """Stands in for a captured graph on CPU: replay runs the captured forward on the graph's buffers."""

    def __init__(self, graphs, query_len: int, size: int) -> None:
        self.graphs, self.key = graphs, (query_len, size)

    def replay(self) -> None:
        self.graphs.outputs[self.key].copy_(self.graphs._forward(*self.key))


@pytest.mark.parametrize("query_len", [1, 3])
@pytest.mark.parametrize("max_logit_rows", [256, 2])  # 2: the size-4 graph ends at the hidden states
def test_graphs_stage_pad_and_slice_on_cpu(query_len, max_logit_rows):
    from tokenmill.runner.cuda_graphs import DecodeGraphs

    model, caches, tables, vocab = _setup("cpu")
    eager_caches = _clone(caches)
    graphs = DecodeGraphs(model, caches, BLOCK, max_batch=4, max_blocks_per_seq=4, device=torch.device("cpu"),
                          query_lens=(1, 3), max_logit_rows=max_logit_rows)
    hidden_size = model.model.norm.weight.shape[0]
    for q in graphs.query_lens:
        for size in graphs.sizes:
            in_graph = graphs.logits_in_graph(q, size)
            assert in_graph == (size * q <= max_logit_rows)
            graphs.outputs[q, size] = torch.empty(size * q, vocab if in_graph else hidden_size)
            graphs.graphs[q, size] = _EagerReplay(graphs, q, size)
    ids, positions, meta = _step(tables, query_len, vocab, seed=query_len, device="cpu")
    assert graphs.can_run(meta)
    with torch.inference_mode():
        replayed = graphs.run(ids, positions, meta).clone()  # 3 sequences padded to the size-4 graph
        eager = model.compute_logits(model(ids, positions, eager_caches, meta))
    assert replayed.shape == (len(CONTEXTS) * query_len, vocab)
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    for graph_layer, eager_layer in zip(caches, eager_caches, strict=True):  # padding rows wrote no KV
        assert torch.equal(graph_layer.kv, eager_layer.kv)
    _, _, other = _step(tables, 2, vocab, seed=0, device="cpu")
    assert not graphs.can_run(other)  # no graphs for query length 2


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("query_len", [1, 4])
@pytest.mark.parametrize("max_logit_rows", [256, 2])  # 2: graphs of more tokens end at the hidden states
def test_graph_replay_matches_eager_and_sequential_decode(query_len, max_logit_rows):
    from tokenmill.runner.cuda_graphs import DecodeGraphs

    model, caches, tables, vocab = _setup("cuda")
    eager_caches, step_caches = _clone(caches), _clone(caches)
    graphs = DecodeGraphs(model, caches, BLOCK, max_batch=4, max_blocks_per_seq=4, device=torch.device("cuda"),
                          query_lens=(1, 4), max_logit_rows=max_logit_rows)
    graphs.capture()
    ids, positions, meta = _step(tables, query_len, vocab, seed=query_len, device="cuda")
    assert graphs.can_run(meta) and meta.decode_query_len == query_len
    with torch.inference_mode():
        replayed = graphs.run(ids, positions, meta).clone()
        eager = model.compute_logits(model(ids, positions, eager_caches, meta))
        assert replayed.shape == (len(CONTEXTS) * query_len, vocab)
        assert _rel_err(replayed, eager) <= 1e-4
        if query_len == 1:
            return
        # Token j of a verification row = a one-token decode after tokens 0..j-1 (on the pre-step cache).
        for j in range(query_len):
            rows = torch.arange(len(CONTEXTS), device="cuda") * query_len + j
            lens = [n + j + 1 for n in CONTEXTS]
            one = AttentionMetadata.build([1] * len(CONTEXTS), lens, tables, BLOCK, "cuda")
            logits = model.compute_logits(model(ids[rows], positions[rows], step_caches, one))
            assert _rel_err(replayed[rows], logits) <= 1e-4, j
