"""The flat CPU decode stack (quantization/cpu_decode_stack.py): on a tiny Q4_0 / Q4_1 GGUF served in bf16 from
PyTorch's int4 CPU kernel, decode steps (one token, and a uniform two-token verification step) give bit-identical
logits to the module path, stay close to the fp32 dequantized model, and the stack refuses what it does not cover
(8-bit groups, fp32 caches, mixed prefill steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tokenmill.attention.kv_cache import KVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import KVCacheSpec, ModelConfig
from tokenmill.kernels.wna16_cpu import cpu_kernels_available
from tokenmill.model import load_model
from tokenmill.quantization import cpu_decode_stack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import make_prompts, rel_err, run_in_steps, write_tiny_gguf  # noqa: E402
from test_gguf_packed import _build  # noqa: E402  (a GGUF built packed or dequantized, weights loaded)

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="this torch has no CPU weight-only kernels")

# a mixed prefill (module path), then decode steps of one token and a uniform two-token (verification) step
STEPS = [[5, 3, 6], [1, 1, 1], [2, 2, 2], [1, 1, 1], [1, 1, 1]]
LENGTHS = [sum(step[i] for step in STEPS) for i in range(3)]


def _logits(model: torch.nn.Module, prompts: list[torch.Tensor], steps: list[list[int]], flat: bool,
            cache_dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    model.model.flat_cpu_decode = flat
    return run_in_steps(model, prompts, steps, cache_dtype=cache_dtype)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_flat_decode_steps_equal_the_module_path_bit_for_bit(tiny_llama, tmp_path, type_name, monkeypatch):
    model = _build(write_tiny_gguf(tiny_llama, tmp_path / f"tiny-{type_name}.gguf", type_name), True, torch.bfloat16)
    prompts = make_prompts(LENGTHS, 300, seed=7)
    flat_steps = []
    forward = cpu_decode_stack.CPUDecodeStack.forward
    monkeypatch.setattr(cpu_decode_stack.CPUDecodeStack, "forward",
                        lambda self, ids, *rest: flat_steps.append(len(ids)) or forward(self, ids, *rest))
    flat = _logits(model, prompts, STEPS, flat=True)
    assert flat_steps == [3, 6, 3, 3]  # every decode-shaped step, not the mixed prefill
    modules = _logits(model, prompts, STEPS, flat=False)
    assert len(flat_steps) == 4
    for got, want in zip(flat, modules, strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    # batch 1 (the sequence sees all its keys: no mask), its prompt a uniform step too
    one, prompt = [[5], [1], [1], [1]], [prompts[0][:8]]
    assert torch.equal(_logits(model, prompt, one, flat=True)[0], _logits(model, prompt, one, flat=False)[0])


@pytest.mark.parametrize("method, kind", [("rtn4", "int4"), ("int8", "int8")])
def test_online_quantized_weights_take_the_flat_stack_bit_for_bit(tiny_llama, method, kind):
    """--quantization rtn4 (int4 groups of 128) and int8 (per row: PyTorch's int8 kernel) in bf16 on CPU."""
    config = ModelConfig(model=str(tiny_llama), dtype="bfloat16", device="cpu", quantization=method)
    model = load_model(config, TorchAttentionBackend()).model
    prompts = make_prompts(LENGTHS, 300, seed=10)
    flat = _logits(model, prompts, STEPS, flat=True)
    assert model.model._cpu_stack is not None and model.model._cpu_stack.layers[0].down.kind == kind
    for got, want in zip(flat, _logits(model, prompts, STEPS, flat=False), strict=True):
        assert torch.equal(got, want)


def test_flat_decode_logits_stay_close_to_the_fp32_dequantized_model(tiny_llama, tmp_path):
    path = write_tiny_gguf(tiny_llama, tmp_path / "tiny-Q4_1.gguf", "Q4_1")
    packed, dense = _build(path, True, torch.bfloat16), _build(path, False)
    prompts = make_prompts(LENGTHS, 300, seed=8)
    ours = _logits(packed, prompts, STEPS, flat=True)
    reference = _logits(dense, prompts, STEPS, flat=True, cache_dtype=torch.float32)
    assert packed.model._cpu_stack is not None and dense.model._cpu_stack is None  # fp32 keeps the modules
    for got, want in zip(ours, reference, strict=True):
        assert rel_err(got.float(), want) < 3e-2  # bf16 activations vs the fp32 dequantized model


def test_the_stack_refuses_what_it_does_not_cover(tiny_llama, tmp_path):
    q8 = _build(write_tiny_gguf(tiny_llama, tmp_path / "tiny-Q8_0.gguf", "Q8_0"), True, torch.bfloat16)
    assert cpu_decode_stack.for_model(q8.model) is None  # 8-bit groups: no CPU kernel, slab-wise dequantize
    q4 = _build(write_tiny_gguf(tiny_llama, tmp_path / "tiny-Q4_0.gguf", "Q4_0"), True, torch.bfloat16)
    stack = cpu_decode_stack.for_model(q4.model)
    assert stack is not None
    ids = make_prompts([6], 300, seed=9)[0]
    decode = AttentionMetadata.build([1], [6], [[0, 1]], 4, "cpu")

    def caches(dtype: torch.dtype) -> list:
        return KVCache(KVCacheSpec(4, q4.num_kv_heads, q4.head_dim, dtype), q4.num_layers, 4, "cpu").layers

    assert stack.accepts(ids[:1], caches(torch.bfloat16), decode)
    assert not stack.accepts(ids[:1], caches(torch.float32), decode)
    mixed = AttentionMetadata.build([5, 1], [5, 6], [[0, 1], [2, 3]], 4, "cpu")
    assert not stack.accepts(ids, caches(torch.bfloat16), mixed)
