"""Build one rank's shard of a Llama-family model: the skeleton on the meta device, parallel layers for real.

Only this rank's slices are ever allocated (the full-size layers exist on ``meta`` and cost nothing), so no rank
holds the whole model; checkpoint names and ``load_weights`` stay those of the TP=1 model.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend
from tokenmill.distributed.context import ParallelContext
from tokenmill.model.layers import RMSNorm, RotaryEmbedding
from tokenmill.model.loader import default_dtype
from tokenmill.model.parallel_layers import (
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    merged_column_parallel_linear,
    qkv_parallel_linear,
)
from tokenmill.model.registry import get_model_class
from tokenmill.model.spec import ModelSpec


def build_parallel_model(
    spec: ModelSpec, attn_backend: AttentionBackend, dtype: torch.dtype, device: str | torch.device,
    ctx: ParallelContext,
) -> nn.Module:
    """This rank's uninitialised shard on ``device``; load it with ``model.load_weights`` (full tensors or slices)."""
    with default_dtype(dtype):
        with torch.device("meta"):
            model = get_model_class(spec.architecture)(spec, attn_backend)
        with torch.device(device):
            _swap_parallel_layers(model, spec, ctx)
            _rebuild_replicated(model, spec)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"parallel model build left {len(left)} tensors unallocated, e.g. {left[:3]}")
    return model.eval().requires_grad_(False)


def check_parallel_shape(spec: ModelSpec, world_size: int) -> None:
    """Raise ValueError (before any process starts) when the heads or MLP width cannot be split over the ranks."""
    for what, size in (("num_attention_heads", spec.num_heads), ("intermediate_size", spec.intermediate_size)):
        if size % world_size:
            raise ValueError(f"{what} ({size}) must be divisible by tensor_parallel_size ({world_size})")
    kv = spec.num_kv_heads
    if (kv >= world_size and kv % world_size) or (kv < world_size and world_size % kv):
        raise ValueError(f"num_key_value_heads ({kv}) and tensor_parallel_size ({world_size}) must divide one another")


def _swap_parallel_layers(model: nn.Module, spec: ModelSpec, ctx: ParallelContext) -> None:
    local_kv = spec.num_kv_heads
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.qkv_proj, attn.num_heads, local_kv = qkv_parallel_linear(
            spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.qkv_bias, ctx
        )
        attn.num_kv_heads = local_kv
        attn.q_size = attn.num_heads * spec.head_dim
        attn.kv_size = local_kv * spec.head_dim
        attn.o_proj = RowParallelLinear(spec.num_heads * spec.head_dim, spec.hidden_size, spec.o_bias, ctx)
        size = spec.intermediate_size
        layer.mlp.gate_up_proj = merged_column_parallel_linear(
            spec.hidden_size, {"gate": size, "up": size}, spec.mlp_bias, ctx
        )
        layer.mlp.down_proj = RowParallelLinear(size, spec.hidden_size, spec.mlp_bias, ctx)
    embed = VocabParallelEmbedding(spec.vocab_size, spec.hidden_size, ctx)
    model.model.embed_tokens = embed
    model.lm_head = ParallelLMHead(embed, spec.tie_word_embeddings)
    model.num_kv_heads = local_kv  # the runner sizes and allocates this rank's KV cache from it


def _rebuild_replicated(model: nn.Module, spec: ModelSpec) -> None:
    """Norms and the rope table are small and whole on every rank: rebuild them off the meta device."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RMSNorm):
                setattr(parent, name, RMSNorm(child.weight.shape[0], child.eps))
    rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings)
    model.model.rotary_emb = rotary
    for layer in model.model.layers:
        layer.self_attn._rotary = (rotary,)  # each attention keeps the shared table outside its children
