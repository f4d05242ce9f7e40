"""The synthetic tokenizer of random-weight presets: covers the vocabulary, round-trips ids, marks EOS special."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from tokenmill.config import ModelConfig
from tokenmill.model.loader import random_weights_tokenizer
from tokenmill.model.presets import preset_spec
from tokenmill.model.synthetic_tokenizer import build_hf_tokenizer, save_preset_tokenizer, synthetic_tokenizer


def test_covers_the_vocabulary_and_round_trips_random_ids():
    tok = synthetic_tokenizer(1000, [7, 9])
    assert tok.vocab_size == 1000
    assert tok.eos_token_id == 7
    ids = np.random.default_rng(0).integers(1, 1000, size=200).tolist()
    text = tok.decode(ids, skip_special_tokens=False)
    assert tok.encode(text, add_special_tokens=False) == ids
    assert "t7" not in tok.decode([5, 7, 6]).split()  # EOS is special: skipped when decoding for output


def test_unknown_words_encode_to_unk_and_chat_renders():
    tok = synthetic_tokenizer(100, [99])
    assert tok.encode("hello t5", add_special_tokens=False) == [0, 5]
    ids = tok.apply_chat_template([{"role": "user", "content": "t3 t4"}])
    assert 3 in ids and 4 in ids


def test_rejects_eos_outside_the_vocabulary():
    with pytest.raises(ValueError, match="eos token ids"):
        build_hf_tokenizer(10, [10])


def test_preset_wider_than_the_embedded_tokenizer_gets_a_synthetic_one():
    spec = preset_spec("tiny-llama3")
    tok = random_weights_tokenizer(ModelConfig(random_weights="tiny-llama3", device="cpu"), spec)
    assert tok.vocab_size >= spec.vocab_size
    top = spec.vocab_size - 1
    assert tok.encode(tok.decode([top]), add_special_tokens=False) == [top]


def test_saved_directory_loads_with_autotokenizer(tmp_path):
    path = save_preset_tokenizer("tiny-llama3", tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(path))
    assert len(hf) == 128256
    assert hf.decode([5, 128001, 128009, 6], skip_special_tokens=True) == "t5 t6"
