"""Shapes of known models for ``random_weights``: benchmark real shapes without downloading weights.

``preset_spec(name)`` returns a ModelSpec; ``tiny-llama`` is small enough for CPU tests.
"""

from __future__ import annotations

import copy
from typing import Any

from tokenmill.model.spec import ModelSpec

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

_PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=8192, eos_token_ids=[128001, 128009],
    ),
    "llama2-7b": dict(
        architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e4,
        max_position_embeddings=4096, eos_token_ids=[2],
    ),
    "mistral-7b": dict(
        architecture="MistralForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, eos_token_ids=[2],
    ),
    "qwen3-0.6b": dict(
        architecture="Qwen3ForCausalLM", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
        num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
        tie_word_embeddings=True, qk_norm=True, max_position_embeddings=40960, eos_token_ids=[151645],
    ),
    "llama3-70b": dict(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5,
        max_position_embeddings=8192, eos_token_ids=[128001, 128009],
    ),
    # Vocabulary covers the embedded SmolLM2 tokenizer (49152 ids) so its text round-trips.
    "tiny-llama": dict(
        architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=1e4,
        max_position_embeddings=2048, eos_token_ids=[2],
    ),
    # Llama-3's vocabulary on a toy body: wider than any embedded tokenizer, so it gets the synthetic one.
    "tiny-llama3": dict(
        architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=64, intermediate_size=128,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=5e5,
        max_position_embeddings=2048, eos_token_ids=[128001, 128009],
    ),
}


def preset_names() -> list[str]:
    return list(_PRESETS)


def preset_spec(name: str) -> ModelSpec:
    if name not in _PRESETS:
        raise ValueError(f"random_weights preset {name!r} is unknown; choose from {', '.join(_PRESETS)}")
    return ModelSpec(**copy.deepcopy(_PRESETS[name]))
