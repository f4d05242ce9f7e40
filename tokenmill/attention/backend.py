"""The attention backend interface and the name -> backend registry.

A backend writes this step's keys/values into the paged cache and returns attention outputs for every
query token. It also owns its metadata: it builds it from the step's host arrays (``prepare_metadata``) and
keeps the fixed buffers its CUDA graphs read (``graph_buffers``), so the runner never looks inside.
The pure-torch backend is the reference; the Triton backend (GPU) must agree with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from tokenmill.attention.graph_buffers import DecodeGraphBuffers
from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.attention.metadata import AttentionMetadata, HostLayout
from tokenmill.transfer import upload_arrays


class AttentionBackend:
    name: str = "base"
    # True: the model hands query/key over unrotated with ``rotary`` and the backend applies it (the Triton
    # backend inside its KV-cache write); False: the model rotates them first and passes no ``rotary``.
    fuses_rotary: bool = False

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: LayerKVCache | torch.Tensor,  # this layer's cache (a bare layer tensor is wrapped)
        meta: AttentionMetadata,
        scale: float,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,  # (positions [T], cos_sin_cache [P, D])
        k_scale: torch.Tensor | None = None,  # dequantization scales of stored K/V (FP8 KV); None: exact
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        raise NotImplementedError

    # ---- metadata: built here from the step's host arrays, uploaded by the runner in its one copy ------
    def metadata_arrays(self, layout: HostLayout) -> list[np.ndarray]:
        """Host arrays this backend needs on the device; ``prepare_metadata`` gets them back in order."""
        return [layout.slot_mapping, layout.query_start_loc, layout.seq_lens, layout.block_tables]

    def prepare_metadata(self, layout: HostLayout, arrays: Sequence[torch.Tensor]) -> AttentionMetadata:
        slot_mapping, *int32 = arrays
        return AttentionMetadata.from_layout(layout, slot_mapping, int32)

    def build_metadata(self, query_lens: Sequence[int], seq_lens: Sequence[int],
                       block_tables: Sequence[Sequence[int]], block_size: int,
                       device: torch.device | str) -> AttentionMetadata:
        """Metadata from per-sequence lists, uploaded on its own (profiling runs and tests)."""
        layout = HostLayout.build(query_lens, seq_lens, block_tables, block_size)
        return self.prepare_metadata(layout, upload_arrays(self.metadata_arrays(layout), device))

    # ---- CUDA graphs: the buffers captured graphs read, with their capture/replay hooks ----------------
    def graph_buffers(self, max_batch: int, max_blocks: int, block_size: int, query_len: int,
                      device: torch.device | str) -> DecodeGraphBuffers:
        return DecodeGraphBuffers(max_batch, max_blocks, block_size, query_len, device)

    @staticmethod
    def check_scales(cache: LayerKVCache, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> None:
        """Scales must come as a pair of the spec's shape, and only for a spec that declares them."""
        expected = cache.spec.scale_shape
        if (k_scale is None) != (v_scale is None):
            raise ValueError("k_scale and v_scale come together")
        if k_scale is None:
            if expected is not None:
                raise ValueError(f"this KV cache stores scaled values ({cache.spec.scale_granularity}): pass "
                                 "k_scale and v_scale")
            return
        if expected is None or tuple(k_scale.shape) != expected or tuple(v_scale.shape) != expected:
            raise ValueError(f"k/v scales of shape {tuple(k_scale.shape)}/{tuple(v_scale.shape)} do not match "
                             f"the KV cache spec (scale shape {expected})")


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
