"""Load one rank's shard: HF safetensors read slice by slice (get_slice), or random weights of a preset shape.

Rank 0 also gathers what the engine needs besides the model (tokenizer, EOS ids, context length, name).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.distributed.context import ParallelContext
from tokenmill.distributed.parallel_model import build_parallel_model
from tokenmill.model.loader import (
    LoadedModel,
    eos_token_ids,
    generation_config_eos,
    hf_dir_tokenizer,
    init_random_weights,
    random_weights_tokenizer,
    resolve_max_model_len,
    safetensors_shards,
)
from tokenmill.model.presets import preset_spec
from tokenmill.model.spec import ModelSpec


class LazySlice:
    """A checkpoint tensor not yet read: ``narrow`` reads only the asked-for rows/columns from the file."""

    def __init__(self, handle_slice: Any) -> None:
        self._slice = handle_slice
        self.shape = tuple(handle_slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)]


def iter_safetensors_slices(directory: Path) -> Iterator[tuple[str, torch.Tensor | LazySlice]]:
    """(name, tensor) for vectors (norms, biases: small, every rank needs them) and (name, LazySlice) for matrices."""
    from safetensors import safe_open

    for shard in safetensors_shards(directory):
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                part = handle.get_slice(name)
                if len(part.get_shape()) < 2:
                    yield name, handle.get_tensor(name)
                else:
                    yield name, LazySlice(part)


def model_spec(model_config: ModelConfig) -> ModelSpec:
    """The model's shape without loading weights (random preset or HF config.json); other sources are refused."""
    if model_config.random_weights is not None:
        return preset_spec(model_config.random_weights)
    from transformers import AutoConfig

    return ModelSpec.from_hf_config(AutoConfig.from_pretrained(str(_hf_directory(model_config))))


def _hf_directory(model_config: ModelConfig) -> Path:
    directory = Path(model_config.model).expanduser() if model_config.model else None
    if directory is None or not (directory / "config.json").is_file():
        raise ValueError(
            f"tensor_parallel_size > 1 needs a Hugging Face safetensors directory or --random-weights; "
            f"got model {model_config.model!r} (GGUF and the embedded default model run on one rank only)"
        )
    return directory


def load_shard(
    model_config: ModelConfig, attn_backend: AttentionBackend, ctx: ParallelContext, device: str
) -> LoadedModel:
    """This rank's model shard on ``device``; the tokenizer is loaded on rank 0 only."""
    dtype = model_config.torch_dtype
    if model_config.random_weights is not None:
        preset = model_config.random_weights
        spec = preset_spec(preset)
        model = build_parallel_model(spec, attn_backend, dtype, device, ctx)
        init_random_weights(model, model_config.seed)
        tokenizer = random_weights_tokenizer(model_config, spec) if ctx.rank == 0 else None
        eos = eos_token_ids(spec, tokenizer)
        return LoadedModel(model, spec, tokenizer, eos, resolve_max_model_len(spec, model_config),
                           model_config.served_model_name or preset, f"random:{preset}")
    directory = _hf_directory(model_config)
    spec = model_spec(model_config)
    max_model_len = resolve_max_model_len(spec, model_config)
    model = build_parallel_model(spec, attn_backend, dtype, device, ctx)
    with torch.no_grad():
        model.load_weights(iter_safetensors_slices(directory))
    tokenizer = hf_dir_tokenizer(directory, model_config) if ctx.rank == 0 else None
    eos = eos_token_ids(spec, tokenizer, generation_config_eos(directory))
    return LoadedModel(model, spec, tokenizer, eos, max_model_len,
                       model_config.served_model_name or directory.resolve().name, str(directory))
