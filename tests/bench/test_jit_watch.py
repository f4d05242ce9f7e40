"""JitWatch records a Triton compile that happens inside it, once per new variant, and restores the hooks."""

from __future__ import annotations

import pytest
import torch

from tokenmill.bench.jit_watch import JitWatch

triton = pytest.importorskip("triton")
tl = triton.language
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@triton.jit
def _scale_kernel(x_ptr, n, FACTOR: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) * FACTOR, mask=i < n)


def test_new_variants_are_recorded_with_their_step():
    from triton import knobs

    x = torch.rand(100, device="cuda") + 1.0
    expected = x.clone()
    before = (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook)
    factor = 3.0 + torch.rand(1).item()  # a constexpr no earlier run compiled in this process
    with JitWatch() as watch:
        watch.step = 4
        _scale_kernel[(1,)](x, 100, FACTOR=factor, BLOCK=128)
        watch.step = 5
        _scale_kernel[(1,)](x, 100, FACTOR=factor, BLOCK=128)  # same variant: no compile
    torch.cuda.synchronize()
    assert torch.allclose(x, expected * factor * factor)
    assert [(c.kernel, c.step) for c in watch.compiles] == [("_scale_kernel", 4)]
    assert watch.compiles[0].seconds > 0 and f"FACTOR={factor}" in watch.compiles[0].variant
    assert (knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook) == before
