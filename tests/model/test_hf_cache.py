"""kv_cache_kwargs names the KV-cache keyword the installed transformers takes, and a cached step then matches a
full forward (a wrong keyword is silently ignored by transformers, which this would catch)."""

import pytest
import torch
from torch import nn

from tokenmill.model.hf_cache import kv_cache_kwargs


def test_cached_step_matches_full_forward() -> None:
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        full = model.model(ids).last_hidden_state
        cache = DynamicCache()
        model.model(ids[:, :8], use_cache=True, **kv_cache_kwargs(model.model, cache))
        step = model.model(ids[:, 8:], use_cache=True, **kv_cache_kwargs(model.model, cache)).last_hidden_state
    torch.testing.assert_close(step[0, 0], full[0, 8], rtol=1e-4, atol=1e-5)


def test_forward_without_a_cache_keyword_is_refused() -> None:
    class NoCache(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(ValueError, match="neither `cache` nor `past_key_values`"):
        kv_cache_kwargs(NoCache(), object())
