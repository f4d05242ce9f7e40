"""Packed GGUF under tensor parallelism (the per-layer shards of all six types are in test_tensor_parallel_shards.py):
a row-parallel split off a group boundary is refused with the sizes named, and two gloo ranks serving a K-quant
GGUF give tp=1's logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from gguf_blocks_helpers import kquant_llama_gguf
from linear_helpers import rank_context

from tokenmill.model.linear import RowParallelLinear
from tokenmill.quantization.gguf import GGUFLinearMethod

HIDDEN, INTER = 256, 512  # K-quant blocks hold 256 input columns


def test_row_parallel_split_off_a_group_boundary_is_refused_with_the_sizes():
    with pytest.raises(ValueError, match=r"GGUF Q4_K: input width 48 \(its 96 input columns split over 2 ranks\) "
                                         r"is not a multiple of the Q4_K group of 32 weights"):
        RowParallelLinear(96, HIDDEN, linear_method=GGUFLinearMethod("Q4_K"), parallel=rank_context(0, 2))
    layer = RowParallelLinear(96, HIDDEN, linear_method=GGUFLinearMethod("Q6_K"), parallel=rank_context(1, 2))
    assert layer.scales.shape == (3, HIDDEN)  # Q6_K's 16-weight groups do fall on the boundary


def test_two_gloo_ranks_serve_a_packed_k_quant_gguf_like_one(tiny_llama_256, tmp_path):
    """Q4_K / Q5_K / Q6_K mixed per layer (one fused qkv dequantized), kept packed on CPU (--quantization gguf):
    tp=2 (rank 0 here, one spawned worker) gives tp=1's last-position logits (1e-5) and greedy tokens."""
    from tokenmill import LLM, SamplingParams

    path = kquant_llama_gguf(tiny_llama_256, tmp_path / "tiny-kquant.gguf")
    args = dict(tokenizer=str(tiny_llama_256), quantization="gguf", device="cpu", dtype="float32",
                max_model_len=128, num_kv_blocks=32, block_size=8)
    prompts = [[5, 9, 17, 3, 40], [41, 42, 43, 44, 45, 46, 7, 8, 9, 10, 11], [200, 7]]
    tp1 = LLM(str(path), **args)
    tp2 = LLM(str(path), tensor_parallel_size=2, **args)
    try:
        layer = tp2.engine.runner.model.model.layers[0]
        assert isinstance(layer.mlp.down_proj.linear_method, GGUFLinearMethod)
        assert layer.mlp.down_proj.input_size == INTER // 2 and layer.self_attn.o_proj.input_size == HIDDEN // 2
        assert layer.self_attn.qkv_proj.output_size == (256 + 2 * 128) // 2  # q + k + v rows, half each
        logits = []
        for llm in (tp1, tp2):
            engine = llm.engine
            for i, ids in enumerate(prompts):
                engine.add_request(f"logits-{i}", ids, SamplingParams(temperature=0.0, max_tokens=4))
            logits.append(engine.runner.forward_logits(engine.scheduler.schedule().record)[0])
            engine.abort_request([f"logits-{i}" for i in range(len(prompts))])
        torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5 * logits[0].abs().max().item())
        params = SamplingParams(temperature=0.0, max_tokens=8)
        want = [o.outputs[0].token_ids for o in tp1.generate(prompts, params, use_tqdm=False)]
        got = [o.outputs[0].token_ids for o in tp2.generate(prompts, params, use_tqdm=False)]
        assert got == want and len(set(map(tuple, want))) > 1
    finally:
        tp2.engine.shutdown()
