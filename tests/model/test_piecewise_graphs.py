"""Piecewise CUDA graphs on a tiny random Llama: a mixed step (decode rows beside prompt chunks of several lengths,
a token count between two captured sizes) through the pieces gives the eager forward's hidden states and writes
the same KV. On CPU the pieces run uncaptured on the same buffers (staging, padding, slicing); on CUDA they
replay captured graphs. Plus the cudagraph_mode / compilation_config validation."""

from __future__ import annotations

import pytest
import torch

from tokenmill.attention.kv_cache import KVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.config import EngineConfig, RunnerConfig, parse_compilation_config
from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.runner.piecewise_graphs import PiecewiseGraphs, token_ladder

BLOCK = 16
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                                                                   reason="needs CUDA + triton"))]


def _model(device: str):
    from tokenmill.attention.backend import get_attention_backend
    from tokenmill.model.loader import build_model, init_random_weights
    from tokenmill.model.presets import preset_spec

    spec = preset_spec("tiny-llama")
    model = build_model(spec, get_attention_backend("auto", device), torch.float32, device)
    init_random_weights(model, seed=0)
    return model, spec


def _mixed_step(spec, device: str, seed: int):
    """Two decode rows first (as the scheduler orders them), then three prompt chunks: 2 + 13 + 5 + 1 = 21
    tokens, padded to the captured 32. The decode rows' contexts and the chunks' earlier tokens are random KV."""
    cached = [30, 17, 0, 8, 0]  # tokens already in the cache per sequence
    query = [1, 1, 13, 5, 1]
    tables = [[3, 9, 4], [7, 1, 2], [11, 12, 20], [21, 22, 23], [5, 6, 8]]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (sum(query),), generator=gen).to(device)
    positions = torch.cat([torch.arange(c, c + q) for c, q in zip(cached, query, strict=True)]).to(device)
    seq_lens = [c + q for c, q in zip(cached, query, strict=True)]
    meta = AttentionMetadata.build(query, seq_lens, tables, BLOCK, device)
    return ids, positions, meta


def _caches(spec, device: str, seed: int) -> KVCache:
    from tokenmill.config import KVCacheSpec

    caches = KVCache(KVCacheSpec(BLOCK, spec.num_kv_heads, spec.head_dim, torch.float32), spec.num_layers, 32, device)
    gen = torch.Generator().manual_seed(seed)
    for layer in caches:
        layer.kv.copy_(torch.randn(layer.kv.shape, generator=gen))
    return caches


@pytest.mark.parametrize("device", DEVICES)
@torch.inference_mode()
def test_mixed_step_through_pieces_matches_eager_forward(device):
    model, spec = _model(device)
    eager_caches, piece_caches = _caches(spec, device, 1), _caches(spec, device, 1)
    graphs = PiecewiseGraphs(model, 64, torch.device(device))
    assert graphs.sizes == [8, 16, 32, 64]
    if device == "cuda":
        graphs.capture()
    for seed in (0, 1):  # twice: the second step finds the buffers holding the first step's values
        ids, positions, meta = _mixed_step(spec, device, seed)
        want = model(ids, positions, eager_caches, meta)
        got = graphs.run(ids, positions, piece_caches, meta).clone()
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for eager_layer, piece_layer in zip(eager_caches, piece_caches, strict=True):
            torch.testing.assert_close(piece_layer.kv, eager_layer.kv, rtol=1e-5, atol=1e-5)
    assert graphs.replays == 2 and graphs.can_run(64) and not graphs.can_run(65)


def test_token_ladder_covers_every_count_up_to_the_cap():
    assert token_ladder(512)[:5] == [8, 16, 32, 64, 128] and token_ladder(512)[-1] == 512
    assert token_ladder(7) == [7]
    ladder = token_ladder(512)
    assert all(b - a <= 64 for a, b in zip(ladder, ladder[1:], strict=False))


def test_cudagraph_mode_is_validated_and_read_from_compilation_config():
    assert EngineConfig.from_kwargs(compilation_config='{"cudagraph_mode": "full_and_piecewise"}').runner.piecewise_graphs
    assert RunnerConfig(cudagraph_mode="NONE").enforce_eager
    assert not RunnerConfig(cudagraph_mode="FULL_AND_PIECEWISE", enforce_eager=True).piecewise_graphs
    with pytest.raises(ValueError, match="cudagraph_mode must be one of"):
        RunnerConfig(cudagraph_mode="PIECEWISE_ONLY")
    with pytest.raises(ValueError, match="not supported"):
        parse_compilation_config({"level": 3})
    with pytest.raises(ValueError, match="JSON object"):
        parse_compilation_config("{cudagraph_mode")


def test_max_cudagraph_capture_size_defaults_to_vllms_cap_and_takes_vllms_names():
    def cap(**kwargs) -> int:
        return EngineConfig.from_kwargs(device="cpu", **kwargs).runner.max_graph_batch_size

    assert cap() == 256  # max_num_seqs' default
    assert cap(max_num_seqs=1024) == 512  # vLLM's default cap
    assert cap(max_num_seqs=1024, max_cudagraph_capture_size=1024) == 1024
    assert cap(max_num_seqs=64, compilation_config={"max_cudagraph_capture_size": 32}) == 32
    with pytest.raises(ValueError, match="max_cudagraph_capture_size must be >= 1"):
        cap(max_cudagraph_capture_size=0)
