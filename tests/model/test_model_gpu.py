"""The model on CUDA in bf16: matches transformers' bf16 run loosely, and random presets build on the GPU."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_prompts, rel_err

from tokenmill.attention.kv_cache import KVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import KVCacheSpec, ModelConfig
from tokenmill.intmath import cdiv
from tokenmill.model import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _prefill(model, prompts: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    lengths = [len(p) for p in prompts]
    block_size = 16
    tables, start = [], 0
    for n in lengths:
        need = cdiv(n, block_size)
        tables.append(list(range(start, start + need))[::-1])
        start += need
    caches = KVCache(KVCacheSpec(block_size, model.num_kv_heads, model.head_dim, dtype), model.num_layers, start,
                     "cuda")
    meta = AttentionMetadata.build(lengths, lengths, tables, block_size, "cuda")
    ids = torch.cat(prompts).cuda()
    positions = torch.cat([torch.arange(n) for n in lengths]).cuda()
    with torch.inference_mode():
        return list(model.compute_logits(model(ids, positions, caches, meta)).split(lengths))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_bf16_cuda_close_to_transformers(tiny_model_dirs, arch):
    from transformers import AutoModelForCausalLM

    directory = tiny_model_dirs[arch]
    config = ModelConfig(model=str(directory), dtype="bfloat16", device="cuda")
    loaded = load_model(config, TorchAttentionBackend())
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    prompts = make_prompts([9, 30, 3], loaded.spec.vocab_size)
    ours = _prefill(loaded.model, prompts, torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        expected = [hf(p[None].cuda()).logits[0].float() for p in prompts]
    for mine, ref in zip(ours, expected, strict=True):
        assert mine.dtype == torch.bfloat16  # the sampler upcasts where it computes (compute_logits)
        assert rel_err(mine.float(), ref) < 3e-2  # bf16 weights/activations vs an fp32 reference


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "llama3-8b"])
def test_random_presets_build_on_gpu(preset):
    config = ModelConfig(random_weights=preset, dtype="bfloat16", device="cuda")
    loaded = load_model(config, TorchAttentionBackend())
    params = list(loaded.model.parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in params)
    logits = _prefill(loaded.model, make_prompts([17, 5], loaded.spec.vocab_size), torch.bfloat16)
    assert all(torch.isfinite(x).all() for x in logits)
    assert logits[0].shape == (17, loaded.spec.vocab_size)
