"""The flat CPU decode stack (quantization/cpu_decode_stack.py): on a tiny Q4_0 / Q4_1 GGUF served in bf16 from
PyTorch's int4 CPU kernel, decode steps (one token and a uniform two-token verification step) give bit-identical
hidden states and KV caches to the module path, stay close to the fp32 dequantized model, and the stack refuses
what it does not cover (fp32, 8-bit groups, fp32 caches)."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from tokenmill.attention.kv_cache import KVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import KVCacheSpec
from tokenmill.kernels.wna16_cpu import cpu_kernels_available
from tokenmill.model.linear import process_weights_after_loading
from tokenmill.model.loader import GGUFSource, build_model
from tokenmill.quantization import cpu_decode_stack

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import make_prompts, rel_err, write_tiny_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_kernels_available(), reason="this torch has no CPU weight-only kernels")

BLOCK = 4


def _build(path: Path, keep_quantized: bool, dtype: torch.dtype) -> torch.nn.Module:
    source = GGUFSource(path, keep_quantized=keep_quantized)
    model = build_model(source.spec(), TorchAttentionBackend(), dtype, "cpu", None, source.quant_config)
    with torch.no_grad():
        source.init_weights(model, False)
        process_weights_after_loading(model)
    return model


def _steps(model: torch.nn.Module, prompts: list[torch.Tensor], step_lens: list[list[int]], flat: bool,
           cache_dtype: torch.dtype = torch.bfloat16) -> tuple[list[torch.Tensor], KVCache]:
    """Hidden states of every step (prompt i fed ``step_lens[s][i]`` tokens at step s), blocks in shuffled order."""
    model.model.flat_cpu_decode = flat
    need = [-(-len(p) // BLOCK) for p in prompts]
    order = list(range(sum(need) + 2))
    random.Random(1).shuffle(order)
    tables = [order[sum(need[:i]) : sum(need[: i + 1])] for i in range(len(prompts))]
    caches = KVCache(KVCacheSpec(BLOCK, model.num_kv_heads, model.head_dim, cache_dtype), model.num_layers,
                     len(order), "cpu")
    done, hidden = [0] * len(prompts), []
    with torch.no_grad():
        for step in step_lens:
            ids = torch.cat([p[done[i] : done[i] + step[i]] for i, p in enumerate(prompts)])
            positions = torch.cat([torch.arange(done[i], done[i] + step[i]) for i in range(len(prompts))])
            seq_lens = [done[i] + step[i] for i in range(len(prompts))]
            meta = AttentionMetadata.build(step, seq_lens, tables, BLOCK, "cpu")
            hidden.append(model(ids, positions, caches, meta))
            done = seq_lens
    return hidden, caches


# a mixed prefill (module path), then decode steps of one token and a uniform two-token (verification) step
STEPS = [[5, 3, 6], [1, 1, 1], [2, 2, 2], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_flat_decode_steps_equal_the_module_path_bit_for_bit(tiny_llama, tmp_path, type_name, monkeypatch):
    path = write_tiny_gguf(tiny_llama, tmp_path / f"tiny-{type_name}.gguf", type_name)
    model = _build(path, True, torch.bfloat16)
    prompts = make_prompts([10, 8, 11], 300, seed=7)
    flat_steps = []
    forward = cpu_decode_stack.CPUDecodeStack.forward
    monkeypatch.setattr(cpu_decode_stack.CPUDecodeStack, "forward",
                        lambda self, ids, *rest: flat_steps.append(len(ids)) or forward(self, ids, *rest))
    flat_hidden, flat_caches = _steps(model, prompts, STEPS, flat=True)
    assert flat_steps == [3, 6, 3, 3]  # every decode-shaped step, not the mixed prefill
    module_hidden, module_caches = _steps(model, prompts, STEPS, flat=False)
    assert len(flat_steps) == 4
    module_hidden, module_caches = _steps(model, prompts, STEPS, flat=False)
    for got, want in zip(flat_hidden, module_hidden, strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    for got, want in zip(flat_caches.layers, module_caches.layers, strict=True):
        assert torch.equal(got.kv, want.kv)
    # batch 1 (the sequence's keys without a mask): the same
    one = [[5], [1], [1], [1]]
    got, _ = _steps(model, prompts[:1], one, flat=True)
    want, _ = _steps(model, prompts[:1], one, flat=False)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_flat_decode_logits_stay_close_to_the_fp32_dequantized_model(tiny_llama, tmp_path):
    path = write_tiny_gguf(tiny_llama, tmp_path / "tiny-Q4_1.gguf", "Q4_1")
    packed, dense = _build(path, True, torch.bfloat16), _build(path, False, torch.float32)
    prompts = make_prompts([10, 8, 11], 300, seed=8)
    ours, _ = _steps(packed, prompts, STEPS, flat=True)
    reference, _ = _steps(dense, prompts, STEPS, flat=True, cache_dtype=torch.float32)
    assert packed.model._cpu_stack is not None and dense.model._cpu_stack is None
    for got, want in zip(ours, reference, strict=True):
        assert rel_err(packed.compute_logits(got).float(), dense.compute_logits(want)) < 3e-2


def test_the_stack_refuses_what_it_does_not_cover(tiny_llama, tmp_path):
    q8 = _build(write_tiny_gguf(tiny_llama, tmp_path / "tiny-Q8_0.gguf", "Q8_0"), True, torch.bfloat16)
    assert cpu_decode_stack.for_model(q8.model) is None  # 8-bit groups: no CPU kernel, slab-wise dequantize
    q4 = _build(write_tiny_gguf(tiny_llama, tmp_path / "tiny-Q4_0.gguf", "Q4_0"), True, torch.bfloat16)
    stack = cpu_decode_stack.for_model(q4.model)
    assert stack is not None
    prompts = make_prompts([6], 300, seed=9)
    meta = AttentionMetadata.build([1], [6], [[0, 1]], BLOCK, "cpu")
    spec = KVCacheSpec(BLOCK, q4.num_kv_heads, q4.head_dim, torch.float32)
    assert not stack.accepts(prompts[0][:1], KVCache(spec, q4.num_layers, 2, "cpu").layers, meta)
    spec = KVCacheSpec(BLOCK, q4.num_kv_heads, q4.head_dim, torch.bfloat16)
    assert stack.accepts(prompts[0][:1], KVCache(spec, q4.num_layers, 2, "cpu").layers, meta)
    mixed = AttentionMetadata.build([5, 1], [5, 6], [[0, 1], [2, 3]], BLOCK, "cpu")
    assert not stack.accepts(prompts[0][:6], KVCache(spec, q4.num_layers, 4, "cpu").layers, mixed)
