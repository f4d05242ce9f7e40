"""Tokenizer: a thin wrapper over a transformers fast tokenizer, with chat-template rendering and override.

The loader builds it (from an HF dir, or a GGUF's converted tokenizer); the server and detokenizer use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def resolve_chat_template(value: str) -> str:
    """A ``--chat-template`` value is a file path or a literal Jinja template."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"chat_template {value!r} is neither an existing file nor a Jinja template")
    return path.read_text(encoding="utf-8")


class Tokenizer:
    """Encode/decode and chat templates over ``hf`` (a transformers PreTrainedTokenizerFast-like object)."""

    def __init__(self, hf: Any, chat_template: str | None = None) -> None:
        self.hf = hf
        if chat_template is not None:
            self.hf.chat_template = resolve_chat_template(chat_template)

    @classmethod
    def from_pretrained(cls, path: str | Path, chat_template: str | None = None) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)), chat_template)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The chat template applied to ``messages`` as text (kwargs reach the template, e.g. tools)."""
        if not self.chat_template:
            raise ValueError(
                "this model's tokenizer has no chat template; pass chat_template (a file or a Jinja string) "
                "or use the completions API with a plain prompt"
            )
        return self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs
        )

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat; the template itself places any BOS, so none is added here."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)
