"""GGUF files: metadata -> ModelSpec, tensors dequantized and renamed to HF names, tokenizer conversion.

Uses the ``gguf`` package's reader and dequantizer; llama.cpp's Q/K row permutation for llama-arch models is
undone here. The converted tokenizer is cached on disk because transformers' conversion takes ~10 s.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenmill.model.layers import rope_inv_freq
from tokenmill.model.spec import ModelSpec
from tokenmill.model.tokenizer import Tokenizer

# GGUF general.architecture -> HF architecture (llama.cpp stores Mistral as "llama").
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# GGUF per-block tensor name -> HF sub-name under model.layers.N.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# Llama 3.1's rope scaling; GGUFs store its per-frequency factors as the rope_freqs tensor instead.
_LLAMA3_DEFAULT_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def open_gguf(path: str | Path) -> Any:
    return _reader_class()(str(path))


@functools.cache
def _reader_class() -> type:
    """``gguf.GGUFReader``, reading through a plain ndarray view of its memmap.

    The reader parses every metadata value with one small numpy view per value (a 49k-token vocabulary and its
    merges: ~250k views); views of an ``np.memmap`` each run its ``__array_finalize__``. Views of the plain array
    over the same mapping skip it: the same bytes, no copy, and SmolLM2-135M's GGUF opens in ~0.8 s instead of
    ~2.7 s (every start-up of a GGUF model). Tensor data are plain views of the mapping too, as
    ``iter_gguf_weights`` already makes them. Falls back to the package's reader if its private ``_get`` changes.
    """
    import inspect

    from gguf import GGUFReader

    get = getattr(GGUFReader, "_get", None)
    if get is None or list(inspect.signature(get).parameters) != ["self", "offset", "dtype", "count", "override_order"]:
        return GGUFReader

    class PlainViewGGUFReader(GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: str | None = None) -> np.ndarray:
            plain = self.__dict__.get("_plain_data")
            if plain is None:  # first call, from GGUFReader.__init__ right after it maps the file
                plain = self._plain_data = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return PlainViewGGUFReader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def gguf_spec(reader: Any) -> ModelSpec:
    """ModelSpec from a GGUF's metadata and tensor list."""
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    hf_arch = GGUF_ARCHITECTURES[arch]
    if arch == "llama" and "mistral" in str(_field(reader, "general.name", "")).lower():
        hf_arch = "MistralForCausalLM"
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count {rope_dim} != head_dim {head_dim}) are not supported")
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    window = _field(reader, f"{arch}.attention.sliding_window")
    spec = ModelSpec(
        architecture=hf_arch,
        vocab_size=int(tensors["token_embd.weight"].shape[1]),  # ggml shapes are [cols, rows]
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32_to_decimal(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_gguf_rope_scaling(reader, arch, head_dim, theta, tensors),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
        mlp_bias="blk.0.ffn_up.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        sliding_window=int(window) if window is not None else None,
        eos_token_ids=sorted(gguf_eos_token_ids(reader)),
    )
    if arch == "qwen3" and not spec.qk_norm:
        raise ValueError("qwen3 GGUF has no attn_q_norm tensors; the file looks incomplete")
    return spec


def _f32_to_decimal(value: float) -> float:
    # GGUF stores floats as f32 (1e-5 reads back as 9.9999997e-06); 7 significant digits recover the decimal.
    return float(f"{float(value):.7g}")


def _gguf_rope_scaling(
    reader: Any, arch: str, head_dim: int, theta: float, tensors: dict[str, Any]
) -> dict[str, Any] | None:
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in tensors:
        # Llama 3.1+ GGUFs: check the stored factors are the standard llama3 ones rather than trust them blindly.
        from gguf.quants import dequantize

        tensor = tensors["rope_freqs.weight"]
        factors = torch.tensor(dequantize(tensor.data, tensor.tensor_type), dtype=torch.float32)
        plain = rope_inv_freq(head_dim, theta, None)
        scaling = dict(_LLAMA3_DEFAULT_ROPE)
        scaling["original_max_position_embeddings"] = int(
            _field(reader, f"{arch}.rope.scaling.original_context_length", 8192)
        )
        expected = plain / rope_inv_freq(head_dim, theta, scaling)
        if factors.shape != expected.shape or not torch.allclose(factors, expected, rtol=1e-3):
            raise ValueError("GGUF rope_freqs factors do not match llama3 rope scaling; custom factors are not supported")
        return scaling
    if scaling_type in ("none", None):
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported; supported: none, linear, llama3")


def gguf_eos_token_ids(reader: Any) -> set[int]:
    ids = set()
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = _field(reader, key)
        if value is not None:
            ids.add(int(value))
    return ids


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF checkpoint name of a GGUF tensor; None for tensors the model does not load (rope_freqs)."""
    match = _BLOCK_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        if part not in _BLOCK_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a supported Llama-family block")
        return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base == "rope_freqs":
        return None
    if base not in _TOP_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a supported Llama-family model")
    return f"{_TOP_NAMES[base]}.{kind}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's row permutation of llama Q/K weights (interleaved rope -> HF rotate-half layout)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_module_types(reader: Any) -> dict[str, str]:
    """HF module name -> GGUF type name (e.g. "Q4_1") of every 2-D weight in the file."""
    types = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is not None and name.endswith(".weight") and len(tensor.shape) == 2:
            types[name.removesuffix(".weight")] = tensor.tensor_type.name
    return types


def iter_gguf_weights(
    reader: Any, spec: ModelSpec, progress: bool = False, packed_type: Callable[[str], str | None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every GGUF tensor, one at a time: dequantized to fp32, or, for a module that
    ``packed_type`` names a type for, its blocks repacked into the kernel layout (quantization/gguf.py) as
    ``<module>.qweight`` / ``.scales`` / ``.zeros``."""
    from gguf.quants import dequantize

    permuted = _field(reader, "general.architecture") == "llama"
    tensors = reader.tensors
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="loading GGUF tensors", unit="tensor")
    for tensor in tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        # A plain-ndarray view skips numpy's per-slice memmap bookkeeping, which dominates dequantize time.
        raw = tensor.data.view(np.ndarray) if isinstance(tensor.data, np.memmap) else tensor.data
        module = name.removesuffix(".weight")
        kept = packed_type(module) if packed_type is not None and name.endswith(".weight") else None
        if kept is not None:
            yield from _packed_tensors(raw, kept, module, spec if permuted else None)
            continue
        array = np.ascontiguousarray(dequantize(raw, tensor.tensor_type), dtype=np.float32)
        if not array.flags.writeable:  # F32 tensors come back as views of the read-only memory map
            array = array.copy()
        weight = torch.from_numpy(array)
        if permuted and name.endswith("q_proj.weight"):
            weight = unpermute_qk(weight, spec.num_heads)
        elif permuted and name.endswith("k_proj.weight"):
            weight = unpermute_qk(weight, spec.num_kv_heads)
        yield name, weight


def _packed_tensors(raw: np.ndarray, type_name: str, module: str,
                    permute_spec: ModelSpec | None) -> Iterator[tuple[str, torch.Tensor]]:
    """One GGUF linear's blocks as kernel-layout tensors; Q/K rows un-permuted like the dequantized path."""
    from tokenmill.quantization.gguf import PACKED_TYPES, gguf_block_codes, kernel_layout

    codes, scales, zeros = gguf_block_codes(raw, type_name)
    heads = None
    if permute_spec is not None and module.endswith("q_proj"):
        heads = permute_spec.num_heads
    elif permute_spec is not None and module.endswith("k_proj"):
        heads = permute_spec.num_kv_heads
    if heads is not None:
        codes, scales = unpermute_qk(codes, heads), unpermute_qk(scales, heads)
        zeros = None if zeros is None else unpermute_qk(zeros, heads)
    for suffix, tensor in kernel_layout(codes, scales, zeros, PACKED_TYPES[type_name].bits).items():
        yield f"{module}.{suffix}", tensor


def tokenizer_cache_root() -> Path:
    root = os.environ.get("TOKENMILL_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "tokenmill"


def load_gguf_tokenizer(
    path: str | Path, chat_template: str | None = None, reader: Any = None
) -> Tokenizer | None:
    """The GGUF's tokenizer via transformers (converted once, then cached); None if the file has none."""
    from transformers import AutoTokenizer

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = tokenizer_cache_root() / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        return Tokenizer(AutoTokenizer.from_pretrained(str(cached)), chat_template)
    # Opening a reader parses every token string (seconds for big vocabularies), so only on a cache miss.
    reader = reader if reader is not None else open_gguf(path)
    if _field(reader, "tokenizer.ggml.model") is None:
        return None
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # Some transformers releases (5.17) map BOS/EOS differently from the file: the file's ids win.
    for role in ("bos", "eos"):
        token_id = _field(reader, f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and getattr(hf, f"{role}_token_id") != int(token_id):
            setattr(hf, f"{role}_token", hf.convert_ids_to_tokens(int(token_id)))
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=f".{key}-"))
    hf.save_pretrained(str(staging))
    try:
        staging.rename(cached)
    except OSError:
        # Another process cached it first; theirs is identical.
        shutil.rmtree(staging, ignore_errors=True)
    return Tokenizer(hf, chat_template)
