"""load_model on HF dirs and random presets: spec parsing, clear errors for unsupported models, EOS ids, names."""

from __future__ import annotations

import json

import pytest
import torch
from model_helpers import load, make_prompts, run_in_steps
from tiny_models import make_tiny_model_dir

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.model import ModelSpec, load_model
from tokenmill.model.presets import preset_names, preset_spec
from tokenmill.model.registry import get_model_class

SUPPORTED = "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"


def test_loaded_model_fields(tiny_model_dirs):
    directory = tiny_model_dirs["llama"]
    loaded = load(directory)
    assert loaded.name == directory.name
    assert loaded.source == str(directory)
    assert loaded.max_model_len == 512
    assert loaded.eos_token_ids == {loaded.tokenizer.eos_token_id}
    assert next(loaded.model.parameters()).dtype == torch.float32
    named = load(directory, served_model_name="my-model", max_model_len=100)
    assert (named.name, named.max_model_len) == ("my-model", 100)


def test_eos_ids_union_config_generation_config_and_tokenizer(tiny_model_dirs, tmp_path):
    directory = make_tiny_model_dir(tmp_path / "eos", "llama")
    generation = json.loads((directory / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, 0]
    (directory / "generation_config.json").write_text(json.dumps(generation))
    assert load(directory).eos_token_ids == {0, 2}


def test_unsupported_architecture_is_a_clear_error(tiny_model_dirs, tmp_path):
    directory = make_tiny_model_dir(tmp_path / "other", "llama")
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"architecture GPT2LMHeadModel is not supported; supported: {SUPPORTED}"):
        load(directory)
    with pytest.raises(ValueError, match="architecture Phi3ForCausalLM is not supported"):
        get_model_class("Phi3ForCausalLM")


def test_sliding_window_shorter_than_context_is_rejected(tmp_path):
    directory = make_tiny_model_dir(tmp_path / "swa", "mistral", sliding_window=64)
    with pytest.raises(ValueError, match=r"sliding_window \(64\) is shorter than max_model_len \(512\)"):
        load(directory)
    # Capping the context at the window makes the model exact, so it loads.
    assert load(directory, max_model_len=64).spec.sliding_window == 64


def test_max_model_len_beyond_model_limit_is_rejected(tiny_model_dirs):
    with pytest.raises(ValueError, match=r"max_model_len \(4096\) must be <= .*max_position_embeddings \(512\)"):
        load(tiny_model_dirs["llama"], max_model_len=4096)


def test_spec_from_old_style_config_dict():
    spec = ModelSpec.from_hf_config(
        {
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192},
            "eos_token_id": [128001, 128009],
            "max_position_embeddings": 131072,
        }
    )
    assert spec.head_dim == 128 and spec.rope_theta == 500000.0
    assert spec.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert spec.eos_token_ids == [128001, 128009]


def test_unknown_rope_type_and_activation_are_rejected():
    base = {
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    with pytest.raises(ValueError, match="rope scaling type 'yarn' is not supported; supported: default, linear, llama3"):
        ModelSpec.from_hf_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        ModelSpec.from_hf_config({**base, "hidden_act": "gelu"})
    spec = ModelSpec.from_hf_config({**base, "sliding_window": 4096, "use_sliding_window": False})
    assert spec.sliding_window is None and spec.qkv_bias and not spec.o_bias


def test_linear_rope_scaling_matches_transformers(tmp_path):
    from model_helpers import hf_logits, rel_err

    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    directory = make_tiny_model_dir(tmp_path / "linear", "llama", rope_parameters=rope)
    loaded = load(directory)
    prompts = make_prompts([40, 11], loaded.spec.vocab_size)
    for ours, ref in zip(run_in_steps(loaded.model, prompts, [[40, 11]]), hf_logits(directory, prompts), strict=True):
        assert rel_err(ours, ref) < 1e-4


def test_not_a_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a directory with config.json nor a .gguf file"):
        load(tmp_path)


def test_missing_tensor_is_reported(tiny_model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = make_tiny_model_dir(tmp_path / "broken", "llama")
    state = load_file(str(directory / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 tensors: model.layers.1.self_attn.qkv_proj.weight\[k\]"):
        load(directory)


def test_random_weights_tiny_llama_builds_and_runs(tiny_model_dirs):
    config = ModelConfig(random_weights="tiny-llama", dtype="float32", device="cpu", tokenizer=str(tiny_model_dirs["llama"]))
    loaded = load_model(config, TorchAttentionBackend())
    assert loaded.name == "tiny-llama" and loaded.source == "random:tiny-llama"
    assert loaded.max_model_len == 2048
    assert loaded.tokenizer is not None
    weight = loaded.model.model.layers[0].self_attn.qkv_proj.weight
    assert 0.015 < weight.std().item() < 0.025
    assert torch.equal(loaded.model.model.norm.weight, torch.ones_like(loaded.model.model.norm.weight))
    prompts = make_prompts([6, 3], loaded.spec.vocab_size)
    logits = run_in_steps(loaded.model, prompts, [[4, 2], [2, 1]])
    assert logits[0].shape == (6, 49152) and torch.isfinite(logits[0]).all()
    # Same seed, same weights.
    again = load_model(config, TorchAttentionBackend())
    assert torch.equal(again.model.model.embed_tokens.weight, loaded.model.model.embed_tokens.weight)


def test_random_weights_bf16_and_presets():
    config = ModelConfig(random_weights="tiny-llama", dtype="bfloat16", device="cpu", tokenizer=None)
    model = load_model(config, TorchAttentionBackend()).model
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.get_default_dtype() == torch.float32  # construction must not leak the dtype
    prompts = make_prompts([5], 49152)
    assert torch.isfinite(run_in_steps(model, prompts, [[5]])[0]).all()
    specs = {name: preset_spec(name) for name in preset_names()}
    assert specs["qwen3-0.6b"].qk_norm and specs["qwen3-0.6b"].tie_word_embeddings
    assert specs["llama3-8b"].rope_scaling["rope_type"] == "llama3"
    assert (specs["llama3-70b"].num_layers, specs["llama3-70b"].hidden_size) == (80, 8192)
    with pytest.raises(ValueError, match="random_weights preset 'gpt-5' is unknown"):
        preset_spec("gpt-5")
