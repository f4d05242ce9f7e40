"""The one weight loader: fused shards (q|k|v, gate|up) and tensor-parallel slices of any weight layout.

Each case loads FULL random checkpoint tensors into every rank's layer, runs each rank's matmul, and combines the
ranks by hand (column-parallel: concatenate each shard's rows; row-parallel: sum) — the result must equal the
reference product on the full weights. No collectives run here (the multi-rank engine is tested in
tests/distributed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from linear_helpers import GROUP, FakePackedMethod, assert_close, dequantize, pack, rank_context
from torch import nn

from tokenmill.model.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    process_weights_after_loading,
)


def random_packed_checkpoint(in_size: int, out_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    values = torch.randint(0, 16, (in_size, out_size), generator=gen)
    zeros = torch.randint(0, 16, (in_size // GROUP, out_size), generator=gen)
    return {
        "qweight": pack(values, 0),
        "qzeros": pack(zeros, 1),
        "scales": torch.rand(in_size // GROUP, out_size, generator=gen) + 0.5,
    }


def dense_checkpoint(in_size: int, out_size: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"weight": torch.randn(out_size, in_size, generator=gen)}


def reference_weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    if "weight" in tensors:
        return tensors["weight"]
    return dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"])


def load(layer: nn.Module, tensors: dict[str, torch.Tensor], shard_id=None) -> None:
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, shard_id)


FORMATS = {"dense": (None, dense_checkpoint), "packed": (FakePackedMethod, random_packed_checkpoint)}


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_qkv_shards_load_by_heads_on_every_rank(fmt, world_size):
    method_cls, make = FORMATS[fmt]
    gen = torch.Generator().manual_seed(world_size)
    hidden, head_dim, heads, kv_heads = 64, 8, 8, 2  # kv_heads < 4 ranks: each KV head replicated
    full = {s: make(hidden, n * head_dim, gen) for s, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    biases = {s: torch.randn(reference_weight(t).shape[0], generator=gen) for s, t in full.items()}
    x = torch.randn(5, hidden, generator=gen)
    want = {s: F.linear(x, reference_weight(full[s]), biases[s]) for s in full}
    got: dict[str, list[torch.Tensor]] = {s: [] for s in full}
    for rank in range(world_size):
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True,
                                  linear_method=method_cls() if method_cls else None,
                                  parallel=rank_context(rank, world_size))
        for s in full:
            load(layer, {**full[s], "bias": biases[s]}, s)
        process_weights_after_loading(layer)
        q, k, v = layer(x).split([layer.num_heads * head_dim, layer.num_kv_heads * head_dim,
                                  layer.num_kv_heads * head_dim], dim=-1)
        for s, part in zip("qkv", (q, k, v), strict=True):
            got[s].append(part)
    assert_close(torch.cat(got["q"], dim=-1), want["q"])
    kv_group = max(1, world_size // kv_heads)  # ranks sharing one KV head hold identical copies
    for s in "kv":
        assert_close(torch.cat(got[s][::kv_group], dim=-1), want[s])
        for rank in range(world_size):
            torch.testing.assert_close(got[s][rank], got[s][rank - rank % kv_group])


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gate_up_and_row_parallel_down_match_the_full_mlp(fmt, world_size):
    method_cls, make = FORMATS[fmt]
    gen = torch.Generator().manual_seed(7)
    hidden, inter = 32, 64
    gate, up, down = make(hidden, inter, gen), make(hidden, inter, gen), make(inter, hidden, gen)
    down_bias = torch.randn(hidden, generator=gen)
    x = torch.randn(3, hidden, generator=gen)
    act = F.silu(F.linear(x, reference_weight(gate))) * F.linear(x, reference_weight(up))
    want = F.linear(act, reference_weight(down), down_bias)
    total = torch.zeros_like(want)
    for rank in range(world_size):
        ctx = rank_context(rank, world_size)
        gate_up = MergedColumnParallelLinear(hidden, {"gate": inter, "up": inter},
                                             linear_method=method_cls() if method_cls else None, parallel=ctx)
        down_proj = RowParallelLinear(inter, hidden, bias=True, linear_method=method_cls() if method_cls else None,
                                      parallel=ctx)
        load(gate_up, gate, "gate")
        load(gate_up, up, "up")
        load(down_proj, {**down, "bias": down_bias})
        process_weights_after_loading(gate_up)
        process_weights_after_loading(down_proj)
        g, u = gate_up(x).chunk(2, dim=-1)
        # Each rank's partial product, bias excluded; the all-reduce's sum is done here, the bias added once.
        total += down_proj.linear_method.apply(down_proj, F.silu(g) * u, None)
    assert_close(total + down_bias, want)


def test_packed_offsets_divide_by_the_packing_factor_on_the_packed_dim():
    gen = torch.Generator().manual_seed(3)
    full = random_packed_checkpoint(64, 32, gen)
    layer = ColumnParallelLinear(64, 32, linear_method=FakePackedMethod(), parallel=rank_context(1, 2))
    load(layer, full)
    assert torch.equal(layer.qweight, full["qweight"][:, 16:32])  # packed along the input: columns as-is
    assert torch.equal(layer.qzeros, full["qzeros"][:, 2:4])  # packed along the output: 16:32 -> 2:4
    row = RowParallelLinear(64, 32, linear_method=FakePackedMethod(), parallel=rank_context(1, 2))
    load(row, full)
    assert torch.equal(row.qweight, full["qweight"][4:8])  # input 32:64 -> packed rows 4:8
    assert torch.equal(row.qzeros, full["qzeros"][2:4])  # groups 2:4
    assert torch.equal(row.scales, full["scales"][2:4])


def test_misshaped_shards_and_unknown_shard_ids_are_refused():
    layer = MergedColumnParallelLinear(16, {"gate": 32, "up": 32}, parallel=rank_context(0, 2))
    with pytest.raises(ValueError, match="shard id 'down' is not one of"):
        layer.weight_loader(layer.weight, torch.randn(32, 16), "down")
    with pytest.raises(ValueError, match=r"shard 'gate': checkpoint tensor has shape \(32, 8\)"):
        layer.weight_loader(layer.weight, torch.randn(32, 8), "gate")
    with pytest.raises(ValueError, match="must be divisible by tensor_parallel_size"):
        RowParallelLinear(30, 16, parallel=rank_context(0, 4))


@pytest.mark.parametrize("world_size", [1, 3])
def test_vocab_rows_split_with_padding_and_the_lm_head_matches(world_size):
    gen = torch.Generator().manual_seed(5)
    vocab, hidden = 10, 8  # 3 ranks: 4 + 4 + 2 real rows, the last rank padded
    table = torch.randn(vocab, hidden, generator=gen)
    ids = torch.tensor([0, 3, 4, 9, 7])
    hidden_states = torch.randn(2, hidden, generator=gen)
    embedded, logits = torch.zeros(len(ids), hidden), []
    for rank in range(world_size):
        ctx = rank_context(rank, world_size)
        embed = VocabParallelEmbedding(vocab, hidden, parallel=ctx)
        head = ParallelLMHead(vocab, hidden, parallel=ctx, tie_to=embed)
        embed.weight.weight_loader(embed.weight, table)
        assert head.weight is embed.weight
        local = ids - embed.vocab_start
        outside = (local < 0) | (local >= embed.num_real_rows)
        embedded += embed.linear_method.embedding(embed, local.masked_fill(outside, 0)).masked_fill(
            outside.unsqueeze(-1), 0.0)
        logits.append(head.linear_method.apply(head, hidden_states, None))
    assert_close(embedded, table[ids])
    assert_close(torch.cat(logits, dim=-1)[:, :vocab], F.linear(hidden_states, table))
