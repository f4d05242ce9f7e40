"""Attention over the paged KV cache: the cache object, the metadata a step carries and the swappable backends."""

from tokenmill.attention.backend import AttentionBackend, get_attention_backend
from tokenmill.attention.kv_cache import KVCache, LayerKVCache
from tokenmill.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "KVCache", "LayerKVCache", "get_attention_backend"]
