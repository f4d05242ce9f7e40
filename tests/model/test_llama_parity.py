"""Our Llama-family decoder vs transformers on tiny random checkpoints of all four architectures (fp32, CPU).

Covers packed full prefill, chunked prefill through a shuffled paged cache, decode, llama3 rope, sharding.
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import hf_logits, load, make_prompts, rel_err, run_in_steps
from tiny_models import make_tiny_model_dir

LENGTHS = [7, 13, 4]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_prefill_chunked_and_decode_match_transformers(tiny_model_dirs, arch):
    directory = tiny_model_dirs[arch]
    loaded = load(directory)
    prompts = make_prompts(LENGTHS, loaded.spec.vocab_size)
    expected = hf_logits(directory, prompts)

    full = run_in_steps(loaded.model, prompts, [LENGTHS])
    for ours, ref in zip(full, expected, strict=True):
        assert ours.dtype == torch.float32
        assert rel_err(ours, ref) < 1e-4

    # Chunk 1, chunk 2 reading chunk 1 from the cache, then one decode-only step.
    first = [3, 5, 2]
    second = [n - f - 1 for n, f in zip(LENGTHS, first, strict=True)]
    chunked = run_in_steps(loaded.model, prompts, [first, second, [1, 1, 1]], seed=len(arch))
    for ours, ref in zip(chunked, expected, strict=True):
        assert rel_err(ours, ref) < 1e-4
    # Argmax agrees everywhere too (a cheap guard against a systematic position offset).
    for ours, ref in zip(chunked, expected, strict=True):
        assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_model_interface_attributes(tiny_model_dirs):
    loaded = load(tiny_model_dirs["qwen3"])
    model, spec = loaded.model, loaded.spec
    assert (model.num_layers, model.num_kv_heads, model.head_dim, model.vocab_size) == (2, 2, 32, spec.vocab_size)
    assert spec.architecture == "Qwen3ForCausalLM" and spec.qk_norm and spec.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    names = {n for n, _ in model.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names


def test_llama3_rope_scaling_beyond_original_context(tmp_path):
    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    }
    directory = make_tiny_model_dir(tmp_path / "llama3", "llama", rope_parameters=rope)
    loaded = load(directory)
    assert loaded.spec.rope_scaling is not None and loaded.spec.rope_scaling["rope_type"] == "llama3"
    lengths = [150, 90]
    prompts = make_prompts(lengths, loaded.spec.vocab_size, seed=1)
    expected = hf_logits(directory, prompts)
    ours = run_in_steps(loaded.model, prompts, [[70, 40], [80, 50]], block_size=16)
    for mine, ref in zip(ours, expected, strict=True):
        assert rel_err(mine, ref) < 1e-4
        assert rel_err(mine[64:], ref[64:]) < 1e-4  # positions past the original context


def test_sharded_safetensors_load_identically(tiny_model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    directory = tiny_model_dirs["qwen2"]
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(directory).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single, multi = load(directory), load(sharded, tokenizer=str(directory))
    for (name, a), (_, b) in zip(single.model.state_dict().items(), multi.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    prompts = make_prompts([5, 9], single.spec.vocab_size)
    for a, b in zip(run_in_steps(single.model, prompts, [[5, 9]]), run_in_steps(multi.model, prompts, [[5, 9]]), strict=True):
        assert torch.equal(a, b)
