"""Tensor-parallel linears and embeddings: each rank holds one slice and its weight_loader takes the FULL tensor.

Column-parallel layers split output rows (q/k/v by heads, gate/up by width); row-parallel layers split input
columns and end with one all-reduce; the vocabulary is split for the embedding and the LM head (logits gathered).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.context import ParallelContext


class Sliceable(Protocol):
    """A full checkpoint tensor, or a lazy handle that reads only the asked-for slice (safetensors get_slice)."""

    @property
    def shape(self) -> Any: ...

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor: ...


def _copy_slice(target: torch.Tensor, loaded: Sliceable, dim: int, start: int, what: str) -> None:
    """Copy rows/cols ``start : start + target.shape[dim]`` of ``loaded`` along ``dim`` into ``target``."""
    length = target.shape[dim]
    full = tuple(loaded.shape)
    if len(full) != target.dim() or start + length > full[dim]:
        raise ValueError(f"checkpoint tensor for {what} has shape {full}; cannot take [{start}:{start + length}] "
                         f"along dim {dim} into a {tuple(target.shape)} shard")
    part = loaded.narrow(dim, start, length)
    if tuple(part.shape) != tuple(target.shape):
        raise ValueError(f"checkpoint tensor for {what} has shape {full}; its shard {tuple(part.shape)} does not "
                         f"match the parameter shard {tuple(target.shape)}")
    target.copy_(part)


def _even_split(size: int, world_size: int, what: str) -> int:
    if size % world_size:
        raise ValueError(f"{what} ({size}) must be divisible by tensor_parallel_size ({world_size})")
    return size // world_size


class ColumnParallelLinear(nn.Module):
    """Several projections of one input fused into one matmul, each output split evenly over ranks by rows.

    ``shards`` maps a shard id to (full output width, start row of this rank's slice in that shard, local width);
    the local weight is the local slices stacked in shard order (so q|k|v and gate|up stay contiguous per rank).
    """

    def __init__(self, input_size: int, shards: dict[str, tuple[int, int, int]], bias: bool = False) -> None:
        super().__init__()
        self.shard_offsets: dict[str, tuple[int, int, int]] = {}  # id -> (local offset, local size, global start)
        offset = 0
        for shard_id, (_, start, size) in shards.items():
            self.shard_offsets[shard_id] = (offset, size, start)
            offset += size
        self.weight = nn.Parameter(torch.empty(offset, input_size))
        self.weight.weight_loader = self._load_shard
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(offset))
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: Sliceable, shard_id: Any = None) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"shard id {shard_id!r} is not one of {list(self.shard_offsets)}")
        offset, size, start = self.shard_offsets[shard_id]
        _copy_slice(param.data.narrow(0, offset, size), loaded, 0, start, f"shard {shard_id!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def qkv_parallel_linear(
    hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool, ctx: ParallelContext
) -> tuple[ColumnParallelLinear, int, int]:
    """Fused q|k|v split by heads; KV heads are replicated when there are fewer of them than ranks.

    Returns the layer and this rank's (query heads, KV heads).
    """
    tp, rank = ctx.world_size, ctx.rank
    local_heads = _even_split(num_heads, tp, "num_attention_heads")
    if num_kv_heads >= tp:
        local_kv = _even_split(num_kv_heads, tp, "num_key_value_heads")
        kv_start = rank * local_kv
    else:
        if tp % num_kv_heads:
            raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads}) when it is larger")
        # Ranks sharing a KV head hold the query heads that use it in the full model (GQA groups stay whole).
        local_kv, kv_start = 1, rank // (tp // num_kv_heads)
    shards = {
        "q": (num_heads * head_dim, rank * local_heads * head_dim, local_heads * head_dim),
        "k": (num_kv_heads * head_dim, kv_start * head_dim, local_kv * head_dim),
        "v": (num_kv_heads * head_dim, kv_start * head_dim, local_kv * head_dim),
    }
    return ColumnParallelLinear(hidden_size, shards, bias), local_heads, local_kv


def merged_column_parallel_linear(
    input_size: int, sizes: dict[str, int], bias: bool, ctx: ParallelContext
) -> ColumnParallelLinear:
    """gate|up (or any even split): each shard's rows split evenly over ranks."""
    shards = {}
    for shard_id, size in sizes.items():
        local = _even_split(size, ctx.world_size, f"{shard_id} output size")
        shards[shard_id] = (size, ctx.rank * local, local)
    return ColumnParallelLinear(input_size, shards, bias)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r W_r^T) + b: input columns split over ranks, one all-reduce, bias added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        local = _even_split(input_size, ctx.world_size, "row-parallel input size")
        self.input_start = ctx.rank * local
        self.weight = nn.Parameter(torch.empty(output_size, local))
        self.weight.weight_loader = self._load_weight
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
            self.bias.weight_loader = self._load_bias

    def _load_weight(self, param: nn.Parameter, loaded: Sliceable, shard_id: Any = None) -> None:
        _copy_slice(param.data, loaded, 1, self.input_start, "a row-parallel weight")

    def _load_bias(self, param: nn.Parameter, loaded: Sliceable, shard_id: Any = None) -> None:
        _copy_slice(param.data, loaded, 0, 0, "a row-parallel bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.ctx.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split over ranks (padded to equal parts); ids outside a rank's rows embed to 0, then sum."""

    def __init__(self, vocab_size: int, hidden_size: int, ctx: ParallelContext) -> None:
        super().__init__()
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // ctx.world_size)
        self.vocab_start = ctx.rank * self.rows_per_rank
        self.num_real_rows = max(0, min(vocab_size - self.vocab_start, self.rows_per_rank))
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size))
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded: Sliceable, shard_id: Any = None) -> None:
        if tuple(loaded.shape)[0] != self.vocab_size:
            raise ValueError(f"checkpoint vocabulary has {tuple(loaded.shape)[0]} rows; the model expects "
                             f"{self.vocab_size}")
        param.data.zero_()  # padding rows of the last rank stay zero
        _copy_slice(param.data.narrow(0, 0, self.num_real_rows), loaded, 0, self.vocab_start, "the vocabulary")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_real_rows)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        hidden = hidden.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce(hidden)


class ParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary slice, all-gathered into [N, vocab] on every rank."""

    def __init__(self, embedding: VocabParallelEmbedding, tied: bool) -> None:
        super().__init__()
        self.ctx = embedding.ctx
        self.vocab_size = embedding.vocab_size
        if tied:
            self.weight = embedding.weight
        else:
            self.weight = nn.Parameter(torch.empty_like(embedding.weight))
            self.weight.weight_loader = embedding._load_weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        return self.ctx.all_gather(logits, dim=-1)[..., : self.vocab_size]
