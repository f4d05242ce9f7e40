"""Llama-family model definitions, weight loading (HF safetensors, GGUF), tokenizer and architecture registry.

The engine calls ``load_model(model_config, attn_backend)`` and gets a ``LoadedModel`` back.
"""

from tokenmill.model.loader import LoadedModel, load_model, load_tokenizer
from tokenmill.model.spec import ModelSpec
from tokenmill.model.tokenizer import Tokenizer

__all__ = ["LoadedModel", "ModelSpec", "Tokenizer", "load_model", "load_tokenizer"]
