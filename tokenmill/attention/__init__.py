"""Attention over the paged KV cache: the metadata a step carries and the swappable backends."""

from tokenmill.attention.backend import AttentionBackend, get_attention_backend
from tokenmill.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "get_attention_backend"]
