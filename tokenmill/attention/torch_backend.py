"""Pure-torch paged attention: the reference every fast backend is tested against; runs on CPU.

Per sequence it gathers keys/values through the block table (``LayerKVCache.gather_kv``) and runs causal
attention where query j of a sequence with ``context_len`` cached tokens sees keys ``0 .. context_len + j``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.attention import cpu_decode
from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.kv_cache import LayerKVCache
from tokenmill.attention.metadata import AttentionMetadata, HostLayout


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: LayerKVCache | torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values into their slots of the paged cache (slots < 0 are padding, skipped)."""
    LayerKVCache.of(kv_cache).store_kv(key, value, slot_mapping)


def gather_kv(kv_cache: LayerKVCache | torch.Tensor, block_table: torch.Tensor,
              seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, num_kv_heads, head_dim] of one sequence, in position order."""
    return LayerKVCache.of(kv_cache).gather_kv(block_table, seq_len)


def masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """GQA attention without repeating K/V: q [..., Hkv, G*Q, D], keys/values [..., Hkv, L, D], visible
    broadcastable to [..., Hkv, G*Q, L]. Softmax in fp32. Plain matmuls beat SDPA's masked CPU path here."""
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 softmax for half types, fp64 stays fp64
    scores = torch.matmul(q, keys.transpose(-1, -2)).to(acc) * scale
    scores.masked_fill_(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values)


def paged_attention_reference(
    query: torch.Tensor, kv_cache: LayerKVCache | torch.Tensor, meta: AttentionMetadata, scale: float,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every query token over its sequence's cached keys (cache must already hold them)."""
    cache = LayerKVCache.of(kv_cache)
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = cache.num_kv_heads
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        q = query[starts[i] : starts[i + 1]]
        q_len = q.shape[0]
        if q_len == 0:
            continue
        keys, values = cache.gather_kv(meta.block_tables[i], seq_len, k_scale, v_scale)
        context_len = seq_len - q_len
        # Causal with an offset: query j may see key t when t <= context_len + j.
        visible = torch.ones(q_len, seq_len, dtype=torch.bool, device=query.device).tril(diagonal=context_len)
        qh = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [Hkv, G, Q, D]
        attn = masked_attention(
            qh.reshape(num_kv_heads, group * q_len, head_dim),
            keys.transpose(0, 1).to(query.dtype),
            values.transpose(0, 1).to(query.dtype),
            visible.repeat(group, 1),
            scale,
        )
        out[starts[i] : starts[i + 1]] = attn.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(
            q_len, num_heads, head_dim
        )
    return out


def decode_attention_batched(
    query: torch.Tensor, kv_cache: LayerKVCache | torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    max_seq_len: int, scale: float, query_len: int = 1,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``query_len`` query tokens per sequence (1, or 1 + k draft tokens), all sequences at once: gather K/V
    padded to max_seq_len, mask the tail and, among the new tokens, the future (token j of a sequence of
    length L sees keys ``< L - query_len + j + 1``).

    The per-sequence loop above costs one attention call per sequence per layer; batching decodes turns that
    into one call per layer (the CPU's hot path when many sequences decode together).
    """
    cache = LayerKVCache.of(kv_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs, num_kv_heads = num_tokens // query_len, cache.num_kv_heads
    group = num_heads // num_kv_heads
    keys, values = cache.gather_kv_padded(block_tables, max_seq_len, k_scale, v_scale)  # [B, L, Hkv, D]
    positions = torch.arange(keys.shape[1], device=query.device)
    # Visible length of new token j: seq_len - query_len + j + 1; rows are ordered (token, group head).
    ends = seq_lens[:, None].long() - query_len + 1 + torch.arange(query_len, device=query.device)  # [B, Q]
    mask = (positions[None, None, :] < ends[:, :, None]).repeat_interleave(group, dim=1)[:, None]  # [B,1,Q*G,L]
    q = query.view(num_seqs, query_len, num_kv_heads, group, head_dim).transpose(1, 2)  # [B, Hkv, Q, G, D]
    out = masked_attention(
        q.reshape(num_seqs, num_kv_heads, query_len * group, head_dim),
        keys.transpose(1, 2).to(query.dtype), values.transpose(1, 2).to(query.dtype), mask, scale,
    )
    out = out.view(num_seqs, num_kv_heads, query_len, group, head_dim).transpose(1, 2)
    return out.reshape(num_tokens, num_heads, head_dim)


@dataclass
class TorchAttentionMetadata(AttentionMetadata):
    """The runner's per-step metadata for this backend: the CPU decode plan is built by the step's first layer
    and read by the others (graph-buffer metadata is refilled in place, so it is the plain class: no plan kept)."""

    decode_plan: cpu_decode.DecodePlan | None = None


class TorchAttentionBackend(AttentionBackend):
    """The reference functions above, except decode-shaped steps on CPU, which take ``cpu_decode`` (one SDPA
    call a layer, its plan built once per step and shared by every layer)."""

    name = "torch"
    fuses_rotary = False  # the model rotates query/key (model/layers.py) before calling forward

    def prepare_metadata(self, layout: HostLayout, arrays: Sequence[torch.Tensor]) -> TorchAttentionMetadata:
        slot_mapping, *int32 = arrays
        return TorchAttentionMetadata.from_layout(layout, slot_mapping, int32)

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
        if rotary is not None:
            raise ValueError("the torch attention backend does not fuse rotary: rotate query/key first")
        cache = LayerKVCache.of(kv_cache)
        scaled = k_scale is not None or v_scale is not None or cache.spec.scale_granularity is not None
        if scaled:
            self.check_scales(cache, k_scale, v_scale)
        if cpu_decode.supports(query, cache, meta, scaled):
            # Built by the step's first layer (every call for metadata built elsewhere: tests, graph buffers).
            plan = getattr(meta, "decode_plan", None)
            if plan is None or plan.block_size != cache.block_size:
                plan = cpu_decode.DecodePlan.build(meta, cache.block_size)
                if isinstance(meta, TorchAttentionMetadata):
                    meta.decode_plan = plan
            return cpu_decode.store_and_attend(query, key, value, cache, meta, plan, scale)
        cache.store_kv(key, value, meta.slot_mapping, k_scale, v_scale)
        if meta.decode_query_len and meta.num_seqs > 1:
            return decode_attention_batched(query, cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
                                            meta.decode_query_len, k_scale, v_scale)
        return paged_attention_reference(query, cache, meta, scale, k_scale, v_scale)
