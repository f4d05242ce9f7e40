"""The attention backend interface and the name -> backend registry.

A backend writes this step's keys/values into the paged cache and returns attention outputs for every
query token. The pure-torch backend is the reference; the Triton backend (GPU) must agree with it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tokenmill.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str
    # True: the model hands query/key over unrotated with ``rotary`` and the backend applies it (the Triton
    # backend inside its KV-cache write); False: the model rotates them first and passes no ``rotary``.
    fuses_rotary: bool

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,  # (positions [T], cos_sin_cache [P, D])
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer (K at 0, V at 1).

    Zero-filled, not empty: batched reference paths multiply masked-out slots by a zero weight, and
    uninitialised memory can hold NaN bit patterns (0 * NaN = NaN).
    """
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def get_attention_backend(name: str, device: str) -> AttentionBackend:
    """'auto' picks Triton on CUDA when it imports, else the torch reference."""
    if name in ("auto", "triton") and device.startswith("cuda"):
        try:
            from tokenmill.attention.triton_backend import TritonAttentionBackend
        except ImportError as exc:
            if name == "triton":
                raise ValueError(f"attention backend 'triton' is unavailable: {exc}") from exc
        else:
            return TritonAttentionBackend()
    if name == "triton":
        raise ValueError("attention backend 'triton' needs a CUDA device")
    from tokenmill.attention.torch_backend import TorchAttentionBackend

    return TorchAttentionBackend()
