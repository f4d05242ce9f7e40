"""Tokenizer wrapper: encode/decode round trips, chat templates (model's, overridden, missing), metadata."""

from __future__ import annotations

import pytest
from model_helpers import load

from tokenmill.model import Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, café 東京 🚀?"}]


def test_encode_decode_round_trip(tiny_llama_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_llama_dir)
    text = "Unicode: café, naïve, Straße, 東京, emoji 🚀🔥 and code: def add(a, b):"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == len(tokenizer.hf) == 384
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    # Special tokens are dropped on decode unless asked for.
    with_special = ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(with_special) == text
    assert tokenizer.decode(with_special, skip_special_tokens=False).endswith("<|im_end|>")
    # The detokenizer's path: ids -> tokens -> string.
    tokens = tokenizer.hf.convert_ids_to_tokens(ids)
    assert tokenizer.hf.convert_tokens_to_string(tokens) == text


def test_chat_template_renders_and_tokenizes(tiny_llama_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_llama_dir)
    text = tokenizer.render_chat(MESSAGES)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert text.endswith("<|im_start|>assistant\n")
    ids = tokenizer.apply_chat_template(MESSAGES)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(1) == 3  # one <|im_start|> per message plus the generation prompt
    without = tokenizer.render_chat(MESSAGES, add_generation_prompt=False)
    assert not without.endswith("<|im_start|>assistant\n")


def test_chat_template_override_literal_and_file(tiny_llama_dir, tmp_path):
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer = Tokenizer.from_pretrained(tiny_llama_dir, chat_template=literal)
    assert tokenizer.render_chat(MESSAGES) == "[system] Be brief.\n[user] Hi, café 東京 🚀?\n"
    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[-1]['content'] }}")
    loaded = load(tiny_llama_dir, chat_template=str(path))
    assert loaded.tokenizer.render_chat(MESSAGES) == "Hi, café 東京 🚀?"
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        Tokenizer.from_pretrained(tiny_llama_dir, chat_template=str(tmp_path / "missing.jinja"))


def test_missing_chat_template_is_a_clear_error(tiny_llama_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.hf.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        tokenizer.apply_chat_template(MESSAGES)
