"""Llama-family model definitions, weight loading (HF safetensors, GGUF), tokenizer and architecture registry.

The engine calls ``load_model(model_config, attn_backend)`` and gets a ``LoadedModel`` back.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.model.loader import LoadedModel, load_model, load_tokenizer
    from tokenmill.model.spec import ModelSpec
    from tokenmill.model.tokenizer import Tokenizer

__all__ = ["LoadedModel", "ModelSpec", "Tokenizer", "load_model", "load_tokenizer"]

# Imported on first use: the loader pulls in torch and transformers (~2.5 s), which commands that only need a
# light submodule such as ``model.spec`` (the gateway and model server, through the CLI's table) should not pay.
_HOME = {"LoadedModel": "loader", "load_model": "loader", "load_tokenizer": "loader", "ModelSpec": "spec",
         "Tokenizer": "tokenizer"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
