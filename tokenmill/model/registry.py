"""Architecture registry: the HF ``architectures`` name -> model class, imported lazily on first use.

The loader asks ``get_model_class(spec.architecture)``; adding an architecture is one line here.
"""

from __future__ import annotations

import importlib

from torch import nn

# HF architecture name -> (module, class); all four share the one Llama-family decoder.
_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("tokenmill.model.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tokenmill.model.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("tokenmill.model.llama", "LlamaForCausalLM"),
    "Qwen3ForCausalLM": ("tokenmill.model.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    return list(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"architecture {architecture} is not supported; supported: {', '.join(_MODELS)}"
        )
    module_name, class_name = _MODELS[architecture]
    return getattr(importlib.import_module(module_name), class_name)
