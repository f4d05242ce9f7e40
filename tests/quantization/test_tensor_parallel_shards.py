"""GPTQ / AWQ / GGUF (all six packed types) linear methods under the layers' one partition loader: fused gate|up
shards and tensor-parallel slices (column and row; GGUF rows on group boundaries) of the real formats, combined by
hand across ranks (no collectives run here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_blocks_helpers import random_gguf_linear
from linear_helpers import rank_context

from tokenmill.model.linear import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    process_weights_after_loading,
)
from tokenmill.quantization.gguf import PACKED_TYPES, GGUFLinearMethod
from tokenmill.quantization.gptq import gptq_quantize
from tokenmill.quantization.linear_methods import AWQLinearMethod, GPTQLinearMethod
from tokenmill.quantization.packing import from_awq, rtn_quantize, to_awq, to_gptq

HIDDEN, INTER, GROUP = 256, 512, 16  # GGUF K-quant blocks hold 256 input columns
GGUF_FORMATS = [f"gguf-{type_name}" for type_name in PACKED_TYPES]


def _checkpoint(fmt: str, out_f: int, in_f: int, gen: torch.Generator, act_order: bool = False):
    """(format tensors, dense reference weight [out, in]) of a random linear."""
    if fmt.startswith("gguf-"):
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        return random_gguf_linear(np.random.default_rng(seed), fmt.removeprefix("gguf-"), out_f, in_f)
    weight = torch.randn(out_f, in_f, generator=gen)
    if fmt == "awq":
        tensors = to_awq(rtn_quantize(weight, 4, GROUP, sym=False))
        return tensors, from_awq(tensors, GROUP).dequantize()  # fp16 scales, as stored
    bits = 8 if fmt == "gptq8" else 4
    if act_order:
        x = torch.randn(256, in_f, generator=gen) * torch.linspace(0.1, 3.0, in_f)[torch.randperm(in_f, generator=gen)]
        qw = gptq_quantize(weight, 2 * x.t() @ x / 256, bits, GROUP, sym=True, act_order=True)
    else:
        qw = rtn_quantize(weight, bits, GROUP, sym=True)
    tensors = to_gptq(qw)
    dense = (qw.codes.float() - 2 ** (bits - 1)) * tensors["scales"].float()[qw.g_idx.long()].t()
    return tensors, dense


def _method(fmt: str, act_order: bool = False):
    if fmt.startswith("gguf-"):
        return GGUFLinearMethod(fmt.removeprefix("gguf-"))
    if fmt == "awq":
        return AWQLinearMethod(4, GROUP)
    return GPTQLinearMethod(8 if fmt == "gptq8" else 4, GROUP, sym=True, desc_act=act_order)


def _load(layer, tensors, shard_id=None):
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, shard_id)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("fmt", ["gptq4", "gptq8", "awq", *GGUF_FORMATS])
def test_fused_gate_up_and_row_parallel_down_match_dense(fmt, world_size):
    gen = torch.Generator().manual_seed(world_size)
    (gate, gate_w), (up, up_w), (down, down_w) = (_checkpoint(fmt, INTER, HIDDEN, gen),
                                                  _checkpoint(fmt, INTER, HIDDEN, gen),
                                                  _checkpoint(fmt, HIDDEN, INTER, gen))
    x = torch.randn(5, HIDDEN, generator=gen)
    want = F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
    total = torch.zeros_like(want)
    for rank in range(world_size):
        ctx = rank_context(rank, world_size)
        gate_up = MergedColumnParallelLinear(HIDDEN, {"gate": INTER, "up": INTER}, linear_method=_method(fmt),
                                             parallel=ctx)
        down_proj = RowParallelLinear(INTER, HIDDEN, linear_method=_method(fmt), parallel=ctx)
        _load(gate_up, gate, "gate")
        _load(gate_up, up, "up")
        _load(down_proj, down)
        process_weights_after_loading(gate_up)
        process_weights_after_loading(down_proj)
        assert gate_up.qweight.dtype == torch.int32
        g, u = gate_up(x).chunk(2, dim=-1)
        total += down_proj.linear_method.apply(down_proj, F.silu(g) * u, None)
    torch.testing.assert_close(total, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_act_order_column_parallel_shards_and_row_parallel_refusal():
    gen = torch.Generator().manual_seed(9)
    tensors, dense = _checkpoint("gptq4", INTER, HIDDEN, gen, act_order=True)
    assert tensors["g_idx"].tolist() != sorted(tensors["g_idx"].tolist())  # a real act-order permutation
    x = torch.randn(3, HIDDEN, generator=gen)
    parts = []
    for rank in range(2):
        layer = MergedColumnParallelLinear(HIDDEN, {"gate": INTER}, linear_method=_method("gptq4", True),
                                           parallel=rank_context(rank, 2))
        _load(layer, tensors, "gate")
        process_weights_after_loading(layer)
        parts.append(layer(x))
    want = F.linear(x, dense)
    torch.testing.assert_close(torch.cat(parts, dim=-1), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with pytest.raises(ValueError, match="act-order"):
        RowParallelLinear(INTER, HIDDEN, linear_method=_method("gptq4", True), parallel=rank_context(0, 2))


def test_fused_shards_with_different_act_order_permutations_are_refused():
    gen = torch.Generator().manual_seed(4)
    first, _ = _checkpoint("gptq4", INTER, HIDDEN, gen, act_order=True)
    second, _ = _checkpoint("gptq4", INTER, HIDDEN, gen, act_order=True)
    layer = MergedColumnParallelLinear(HIDDEN, {"gate": INTER, "up": INTER}, linear_method=_method("gptq4", True))
    _load(layer, first, "gate")
    with pytest.raises(ValueError, match="differs from shard 'gate'"):
        _load(layer, second, "up")


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_quantized_lm_head_vocabulary_shards_match_dense(world_size, act_order):
    """A GPTQ LM head (``lm_head: true``) split by vocabulary rows: each rank loads its rows of qweight / scales
    and its packed qzeros words (8 rows a word), g_idx whole; the ranks' logits side by side are the dense ones."""
    vocab = 8 * 40  # rows per rank a multiple of the 8 rows a qzeros word holds
    gen = torch.Generator().manual_seed(20 + world_size)
    tensors, dense = _checkpoint("gptq4", vocab, HIDDEN, gen, act_order=act_order)
    x = torch.randn(3, HIDDEN, generator=gen)
    parts = []
    for rank in range(world_size):
        head = ParallelLMHead(vocab, HIDDEN, _method("gptq4", act_order), parallel=rank_context(rank, world_size))
        _load(head, tensors)
        process_weights_after_loading(head)
        parts.append(head.linear_method.apply(head, x, None))
    want = F.linear(x, dense)
    torch.testing.assert_close(torch.cat(parts, dim=-1), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with pytest.raises(ValueError, match="checkpoint vocabulary has 320 rows; the model expects 328"):
        _load(ParallelLMHead(vocab + 8, HIDDEN, _method("gptq4")), tensors)
