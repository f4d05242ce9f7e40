"""A synthetic tokenizer covering a random-weight preset's whole vocabulary, built offline (no download).

Each id is one word (``t<id>``), the EOS ids are special tokens, words split on whitespace: decoding ids and
encoding the text gives the same ids back, so a benchmark's prompt lengths are exact. Any other word encodes
to ``<unk>`` (id 0). Good for serving and load-testing random weights; it carries no language.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenmill.model.tokenizer import Tokenizer

UNK_TOKEN = "<unk>"
# A minimal template so /v1/chat/completions works; its words are not in the vocabulary and encode to <unk>.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def word(token_id: int) -> str:
    return f"t{token_id}"


def eos_word(token_id: int) -> str:
    return f"<|eos{token_id}|>"


def build_hf_tokenizer(vocab_size: int, eos_token_ids: Iterable[int]) -> Any:
    """A transformers PreTrainedTokenizerFast of ``vocab_size`` ids (about 2 s for 128k ids)."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    eos = sorted({int(e) for e in eos_token_ids})
    if vocab_size < 2:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= 2 for a synthetic tokenizer")
    bad = [e for e in eos if not 0 < e < vocab_size]
    if bad:
        raise ValueError(f"eos token ids {bad} must lie in [1, {vocab_size}) (id 0 is the unknown token)")
    names = [word(i) for i in range(vocab_size)]
    names[0] = UNK_TOKEN
    for e in eos:
        names[e] = eos_word(e)
    raw = RawTokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token=UNK_TOKEN))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens([AddedToken(eos_word(e), special=True, normalized=False) for e in eos])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token=UNK_TOKEN, eos_token=eos_word(eos[0]) if eos else None
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def synthetic_tokenizer(vocab_size: int, eos_token_ids: Iterable[int], chat_template: str | None = None) -> Tokenizer:
    return Tokenizer(build_hf_tokenizer(vocab_size, eos_token_ids), chat_template)


def save_preset_tokenizer(preset: str, directory: str | Path) -> Path:
    """Write the preset's synthetic tokenizer as an HF tokenizer directory (for ``bench serve --tokenizer``)."""
    from tokenmill.model.presets import preset_spec

    spec = preset_spec(preset)
    path = Path(directory)
    build_hf_tokenizer(spec.vocab_size, spec.eos_token_ids).save_pretrained(str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="write a random-weight preset's synthetic tokenizer directory")
    parser.add_argument("preset")
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    print(save_preset_tokenizer(args.preset, args.directory))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
