"""Triton attention backend: KV-cache write, then paged decode (decode-shaped steps) or prefill attention.

Must agree with ``TorchAttentionBackend``. No host syncs inside ``forward``; decode-shaped steps (every
sequence with one new token, or the same 1 + k for which graph buffers were made) launch a grid fixed by the
batch size and the block-table width, so the runner can capture them in CUDA graphs.
"""

from __future__ import annotations

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.graph_buffers import DecodeGraphBuffers
from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.kernels.kv_cache_write import reshape_and_cache
from tokenmill.kernels.paged_attention import count_leading_decodes, paged_decode, plan_for_config
from tokenmill.kernels.paged_decode_config import decode_config
from tokenmill.kernels.prefill_attention import prefill_attention
from tokenmill.kernels.rotary_kv_write import rotary_and_cache

if not HAS_TRITON:  # get_attention_backend catches ImportError and falls back to the torch reference
    raise ImportError("the Triton attention backend needs the 'triton' package (install tokenmill[gpu])")


class TritonAttentionBackend(AttentionBackend):
    """Padding rows of a CUDA-graph batch need slot_mapping -1 (skipped) and seq_len 0 (output zeros)."""

    name = "triton"
    fuses_rotary = True

    def __init__(self) -> None:
        self._num_sms: dict[int, int] = {}
        # Query lengths sent to the decode kernel. Others (a uniform 5-token prefill, say) stay on the prefill
        # kernel: each length is a kernel variant, compiled when its graphs are captured, never mid-run.
        self.decode_query_lens = {1}

    def graph_buffers(self, max_batch: int, max_blocks: int, block_size: int, query_len: int,
                      device: torch.device | str) -> DecodeGraphBuffers:
        self.decode_query_lens.add(query_len)
        return super().graph_buffers(max_batch, max_blocks, block_size, query_len, device)

    def _sm_count(self, device: torch.device) -> int:
        if device.type != "cuda":  # Triton's CPU interpreter (debugging): any positive count plans correctly
            return 4
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms:
            self._num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._num_sms[index]

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: LayerKVCache | torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cache = LayerKVCache.of(kv_cache)
        if k_scale is not None or v_scale is not None or cache.spec.scale_granularity is not None:
            self.check_scales(cache, k_scale, v_scale)  # FP8 cache: the kernels divide/multiply by them
        scales = {"k_scale": k_scale, "v_scale": v_scale}
        if rotary is not None:  # one kernel rotates q in place and writes rotated k and v into the cache
            rotary_and_cache(query, key, value, rotary[0], rotary[1], cache, meta.slot_mapping, **scales)
        else:
            reshape_and_cache(key, value, cache, meta.slot_mapping, **scales)
        if meta.is_decode_only or meta.decode_query_len in self.decode_query_lens:
            return self._decode(query, cache, meta.block_tables, meta.seq_lens, scale,
                                query_len=meta.decode_query_len or 1, **scales)
        # Leading decode sequences take the GQA decode kernel; the rest (prefills, chunks) the prefill one.
        # Both write into one output; the prefill kernel indexes query/out by absolute token position.
        num_decodes = count_leading_decodes(meta.query_start_loc_cpu)
        out = torch.empty_like(query)
        if num_decodes:
            self._decode(
                query[:num_decodes],
                cache,
                meta.block_tables[:num_decodes],
                meta.seq_lens[:num_decodes],
                scale,
                out=out[:num_decodes],
                **scales,
            )
        return prefill_attention(
            query,
            cache,
            meta.query_start_loc[num_decodes:],
            meta.seq_lens[num_decodes:],
            meta.block_tables[num_decodes:],
            meta.max_query_len,
            scale,
            out=out,
            **scales,
        )

    def _decode(
        self,
        query: torch.Tensor,
        cache: LayerKVCache,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        out: torch.Tensor | None = None,
        query_len: int = 1,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # The config and plan depend on shapes only (block-table width bounds every length): graph-capturable.
        num_seqs = block_tables.shape[0]
        config = decode_config(query.device, cache.spec.dtype, num_seqs)
        plan = plan_for_config(config, num_seqs, cache.num_kv_heads, block_tables.shape[1] * cache.block_size,
                               self._sm_count(query.device))
        return paged_decode(query, cache, block_tables, seq_lens, scale, plan=plan, out=out, query_len=query_len,
                            k_scale=k_scale, v_scale=v_scale, config=config)
