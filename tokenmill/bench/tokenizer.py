"""Loads the model's tokenizer for prompt generation and length counting: an HF directory or a GGUF file.

Everything here is optional: without a tokenizer the datasets fall back to words and the server's usage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | None) -> Any | None:
    """A transformers tokenizer from ``path`` (HF directory, hub-style local dir, or ``.gguf`` file), or None."""
    if not path:
        return None
    from transformers import AutoTokenizer

    target = Path(path)
    if target.suffix == ".gguf":
        if not target.is_file():
            raise ValueError(f"--tokenizer {path} must be an existing .gguf file or a tokenizer directory")
        return AutoTokenizer.from_pretrained(str(target.parent), gguf_file=target.name)
    if not target.exists():
        raise ValueError(f"--tokenizer {path} must be an existing tokenizer directory or .gguf file")
    return AutoTokenizer.from_pretrained(str(target))


def count_tokens(tokenizer: Any | None, text: str) -> int | None:
    """Token count of ``text`` without special tokens, or None when no tokenizer is loaded."""
    if tokenizer is None:
        return None
    return len(tokenizer.encode(text, add_special_tokens=False))
