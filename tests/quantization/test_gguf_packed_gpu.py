"""GGUF linears of every packed type on CUDA: the repacked blocks (gguf_blocks.py; fp32 K-quant scales, Q6_K's
16-weight groups) through the Triton W4A16 / W8A16 kernels in a fused gate|up and a down layer, against the fp32
dequantized weights. No gguf import: random block bytes are built with numpy (the GPU machine has no gguf)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf_blocks_helpers import random_gguf_linear

from tokenmill.kernels._triton import HAS_TRITON
from tokenmill.model.linear import (
    MergedColumnParallelLinear,
    RowParallelLinear,
    process_weights_after_loading,
)
from tokenmill.quantization.gguf import PACKED_TYPES, GGUFLinearMethod

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                                                  reason="needs CUDA + triton")]
HIDDEN, INTER = 512, 768


@pytest.mark.parametrize("rows", [1, 6, 48])
@pytest.mark.parametrize("type_name", list(PACKED_TYPES))
def test_gguf_layers_on_gpu_match_the_fp32_dequantized_weights(type_name, rows):
    rng = np.random.default_rng(rows)
    (gate, gate_w), (up, up_w), (down, down_w) = (random_gguf_linear(rng, type_name, INTER, HIDDEN),
                                                  random_gguf_linear(rng, type_name, INTER, HIDDEN),
                                                  random_gguf_linear(rng, type_name, HIDDEN, INTER))
    with torch.device("cuda"):
        gate_up = MergedColumnParallelLinear(HIDDEN, {"gate": INTER, "up": INTER},
                                             linear_method=GGUFLinearMethod(type_name))
        down_proj = RowParallelLinear(INTER, HIDDEN, linear_method=GGUFLinearMethod(type_name))
    for layer, parts in ((gate_up, {"gate": gate, "up": up}), (down_proj, {None: down})):
        for shard_id, tensors in parts.items():
            for name, tensor in tensors.items():
                getattr(layer, name).weight_loader(getattr(layer, name), tensor.cuda(), shard_id)
        process_weights_after_loading(layer)
    x = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(rows))
    want = F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)
    g, u = gate_up(x.cuda().bfloat16()).float().chunk(2, dim=-1)
    got = down_proj((F.silu(g) * u).bfloat16()).float().cpu()
    assert ((got - want).norm() / want.norm()).item() < 3e-2  # bf16 activations vs fp32
