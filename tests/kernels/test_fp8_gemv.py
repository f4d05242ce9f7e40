"""The FP8-weight GEMV (kernels/fp8_gemv.py: e4m3 weights upcast in registers, bf16 activations) against the fp32
product with the dequantized weight on fresh random inputs, and the FP8 linear method's dispatch to it. sm89+ GPUs,
or CPU under TRITON_INTERPRET=1."""

from __future__ import annotations

import pytest
import torch
from conftest import fp8_device, rel_err

from tokenmill.kernels.fp8_gemv import fp8_gemv
from tokenmill.kernels.fp8_quant import quantize_fp8
from tokenmill.kernels.quant_dispatch import FP8_GEMV_MAX_ROWS, default_fp8_config, fp8_gemv_config
from tokenmill.kernels.splitk import SplitKConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(fp8_device() is None, reason="needs CUDA sm89+ and triton")]
KERNEL_DEVICE = fp8_device  # conftest's ``device`` fixture


def _weights(n: int, k: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    dense = torch.randn(n, k, generator=gen) * torch.logspace(-2, 0, n)[:, None]  # per-channel ranges differ
    q, scale = quantize_fp8(dense, dim=1)
    return q.to(device), scale.view(-1).to(device)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("k,n", [(256, 96), (200, 200)])  # K not a multiple of the K step: masked tail
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_fp8_gemv_matches_dequantized_product(device, rows, k, n, dtype):
    w, scale = _weights(n, k, device, seed=rows + k)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=gen).to(dtype).to(device)
    bias = torch.randn(n, generator=gen).to(dtype).to(device)
    ref = x.float() @ (w.float() * scale[:, None]).t() + bias.float()
    block_m = 1 << (rows - 1).bit_length()
    configs = [SplitKConfig(block_m=min(block_m, 4), block_n=16, block_k=64, split_k=3),
               SplitKConfig(block_m=block_m, block_n=16, block_k=64, split_k=2, kind="fma"),
               SplitKConfig(block_m=16, block_n=32, block_k=64, split_k=2, kind="dot"),
               SplitKConfig(block_m=min(block_m, 4), block_n=16, block_k=64, split_k=2, prefetch=True), None]
    for config in configs:
        out = fp8_gemv(x, w, scale, bias, config)
        assert out.dtype == dtype and out.shape == (rows, n)
        assert rel_err(out, ref) < 2e-2, config
        assert torch.equal(out, fp8_gemv(x, w, scale, bias, config)), config


def test_fp8_gemv_rejects_a_per_tensor_scale_of_the_wrong_size(device):
    w, _ = _weights(32, 64, device, seed=0)
    x = torch.randn(1, 64).bfloat16().to(device)
    with pytest.raises(ValueError, match="one weight scale per output channel"):
        fp8_gemv(x, w, torch.ones(3, device=device))


def test_fp8_dispatch_uses_the_gemv_up_to_its_row_limit_only():
    assert default_fp8_config(1, 4096, 4096) is not None
    assert default_fp8_config(FP8_GEMV_MAX_ROWS, 4096, 4096).dot
    assert default_fp8_config(FP8_GEMV_MAX_ROWS + 1, 4096, 4096) is None
    x = torch.zeros(2, 64)
    tuned = SplitKConfig(block_m=2)
    assert fp8_gemv_config(x, 64, {2: tuned}) is tuned
    assert fp8_gemv_config(x, 64, {2: None}) is None  # the tuner found _scaled_mm faster
