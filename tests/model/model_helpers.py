"""Helpers for model tests: run our model over packed prompts in steps through a shuffled paged cache,
transformers reference logits, and a GGUF writer that mimics llama.cpp's converter for tiny models.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tokenmill.attention.kv_cache import KVCache
from tokenmill.attention.metadata import AttentionMetadata
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.config import KVCacheSpec, ModelConfig
from tokenmill.intmath import cdiv
from tokenmill.model import LoadedModel, load_model


def load(path: Path | str, **kwargs) -> LoadedModel:
    config = ModelConfig(model=str(path), dtype="float32", device="cpu", **kwargs)
    return load_model(config, TorchAttentionBackend())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def make_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


def run_in_steps(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    step_lens: list[list[int]],
    block_size: int = 4,
    seed: int = 0,
    cache_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Feed prompt i in steps of ``step_lens[s][i]`` tokens (all sequences packed per step) and return each
    prompt's logits [len, vocab] (on the CPU). Blocks are handed out in a shuffled order so tables are
    non-contiguous. Runs on the model's device.
    """
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    for i, length in enumerate(lengths):
        if sum(step[i] for step in step_lens) != length:
            raise ValueError(f"step lengths of prompt {i} do not add up to {length}")
    blocks_needed = [cdiv(n, block_size) for n in lengths]
    num_blocks = sum(blocks_needed) + 3
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    tables, start = [], 0
    for need in blocks_needed:
        tables.append(order[start : start + need])
        start += need
    caches = KVCache(KVCacheSpec(block_size, model.num_kv_heads, model.head_dim, cache_dtype), model.num_layers,
                     num_blocks, device)
    done = [0] * len(prompts)
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    with torch.no_grad():
        for step in step_lens:
            ids = torch.cat([p[done[i] : done[i] + step[i]] for i, p in enumerate(prompts)]).to(device)
            positions = torch.cat([torch.arange(done[i], done[i] + step[i]) for i in range(len(prompts))]).to(device)
            seq_lens = [done[i] + step[i] for i in range(len(prompts))]
            meta = AttentionMetadata.build(step, seq_lens, tables, block_size, device)
            out = model.compute_logits(model(ids, positions, caches, meta))
            for i, chunk in enumerate(out.split(step)):
                logits[i].append(chunk.cpu())
            done = seq_lens
    return [torch.cat(parts) for parts in logits]


def hf_logits(directory: Path | str, prompts: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return [model(p[None]).logits[0].float() for p in prompts]


def _permute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf: HF rotate-half rows -> GGML interleaved-pair rows.
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


_GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, layer, rest = base.split(".", 3)
        return f"blk.{layer}.{_GGUF_BLOCK[rest]}.{kind}"
    return f"{_GGUF_TOP[base]}.{kind}"


def write_tiny_gguf(hf_dir: Path, path: Path, qtype_name: str, with_tokenizer: bool = False,
                    encode: Callable[[str, np.ndarray], tuple[np.ndarray, str]] | None = None) -> Path:
    """Convert a tiny HF dir to GGUF the way llama.cpp does (Q/K permuted for llama; 1-D tensors F32).
    ``encode(hf_name, array)`` -> (block bytes, type name) writes the 2-D tensors instead (per-tensor types; the
    gguf package has no K-quant quantizer)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = cfg["model_type"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = cfg["rope_parameters"]
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "llama3":
        # llama.cpp stores Llama 3.1 scaling as per-frequency divisors in a rope_freqs tensor.
        from tokenmill.model.layers import rope_inv_freq

        scaled = rope_inv_freq(head_dim, rope["rope_theta"], rope)
        factors = rope_inv_freq(head_dim, rope["rope_theta"], None) / scaled
        writer.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    if with_tokenizer:
        _add_tokenizer(writer, hf_dir)
    state = load_file(str(hf_dir / "model.safetensors"))
    for name, tensor in state.items():
        array = tensor.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _permute_qk(array, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = _permute_qk(array, kv_heads)
        if array.ndim == 2 and encode is not None:
            raw, type_name = encode(name, array)
            writer.add_tensor(_gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType[type_name])
        elif array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(_gguf_name(name), array.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(_gguf_name(name), array.astype(np.float16))
        else:
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer, hf_dir: Path) -> None:
    """GPT-2 style BPE tokenizer metadata from the tiny tokenizer.json, as llama.cpp writes it."""
    import gguf

    data = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    special = {t["content"]: t["id"] for t in data["added_tokens"]}
    vocab.update(special)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [
        gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL for token in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(special["<|im_start|>"])
    writer.add_pad_token_id(special["<|endoftext|>"])
    writer.add_add_bos_token(False)
    template = config.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").is_file():
        template = (hf_dir / "chat_template.jinja").read_text()
    writer.add_chat_template(template)


def hf_logits_quantized(directory: Path | str, prompts: list[torch.Tensor], qtype_name: str) -> list[torch.Tensor]:
    """transformers' logits with every 2-D weight round-tripped through ``qtype`` (what a GGUF holds).

    Quantization blocks run along rows, so llama.cpp's Q/K row permutation does not change the values.
    """
    import gguf
    from transformers import AutoModelForCausalLM

    qtype = gguf.GGMLQuantizationType[qtype_name]
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                array = param.numpy()
                if qtype == gguf.GGMLQuantizationType.F16:
                    array = array.astype(np.float16).astype(np.float32)
                elif qtype != gguf.GGMLQuantizationType.F32:
                    array = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
                param.copy_(torch.from_numpy(np.ascontiguousarray(array)))
        return [model(p[None]).logits[0].float() for p in prompts]
