"""Incremental detokenizer: turns a sequence's new token ids into text and watches for stop strings.

Decodes a small window of ids per token (vLLM's prefix_offset/read_offset scheme); the engine owns one per sequence.
"""

from __future__ import annotations

from tokenmill.sampling_params import SamplingParams

# Prompt tokens decoded as left context, so tokenizers that render a leading space by context stay right.
INITIAL_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"  # what a byte-level decoder yields for an incomplete UTF-8 sequence


class IncrementalDetokenizer:
    """Output text of one sequence, built token by token in O(window) work per token.

    ``update`` appends new tokens and returns the stop string that ended the text, if any; ``output_text``
    gives the text that is safe to show (while running, a possible stop-string start is held back).
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes ~10x faster than transformers' decode() wrapper, which only
        # converts arguments around the same call (cleanup of spaces is off here anyway).
        self._backend = _backend_decoder(tokenizer)
        self._skip_special_tokens = params.skip_special_tokens
        self._stop = list(params.stop)
        self._include_stop = params.include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        # The window: ids[prefix_offset:read_offset] is text already emitted (context only), ids[read_offset:]
        # are tokens whose text is not emitted yet (they may end inside a multi-byte character).
        self._ids: list[int] = list(prompt_token_ids[-INITIAL_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._prefix_text: str | None = None  # cached decode of ids[prefix_offset:read_offset]
        self._text = ""
        self._stop_reason: str | None = None

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the text, or None."""
        return self._stop_reason

    @property
    def num_window_tokens(self) -> int:
        """Token ids kept for decoding (context plus unread): stays a handful however long the output."""
        return len(self._ids)

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append tokens' text; returns the matched stop string (tokens after a match are ignored) or None."""
        if self._stop_reason is not None:
            return None
        if not self._stop and len(new_token_ids) > 1 and self._append_run(new_token_ids):
            return None
        for token_id in new_token_ids:
            new_text = self._decode_next(token_id)
            if not new_text:
                continue
            searched_from = max(0, len(self._text) - self._max_stop_len + 1)
            self._text += new_text
            if self._stop and self._find_stop(searched_from):
                return self._stop_reason
        return None

    def output_text(self, finished: bool) -> str:
        """The text so far. While running, withhold a tail that could still turn out to be a stop string's
        start (streamed text is never retracted); when finished, also flush any incomplete trailing bytes."""
        if self._stop_reason is not None:
            return self._text
        if finished:
            return self._text + self._pending_text()
        return self._text[: len(self._text) - self._held_back()]

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens)
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _decode_next(self, token_id: int) -> str:
        """Text that ``token_id`` completes, or "" while the window still ends inside a character."""
        self._ids.append(token_id)
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(self._prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""  # a special token skipped, or a multi-byte character not finished yet: wait
        new_text = window_text[len(self._prefix_text) :]
        # Slide the window: what was read becomes context; drop ids before it so the window stays small.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._prefix_text = None
        return new_text

    def _append_run(self, token_ids: list[int]) -> bool:
        """Append several tokens with one decode (no stop string to look for between them): a finished offline
        sequence hands over all its tokens at once, and two decodes per token made that O(tokens) decode calls.
        False, changing nothing, when the run ends inside a character (the per-token path then holds it back)."""
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        ids = self._ids + list(token_ids)
        window_text = self._decode(ids[self._prefix_offset :])
        if window_text.endswith(REPLACEMENT_CHAR):
            return False
        self._ids = ids
        if len(window_text) <= len(self._prefix_text):
            return True  # only skipped special tokens: the window keeps them as context, like the per-token path
        self._text += window_text[len(self._prefix_text) :]
        del self._ids[: max(0, len(self._ids) - INITIAL_CONTEXT_TOKENS)]  # a few ids of context stay the window
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._prefix_text = None
        return True

    def _pending_text(self) -> str:
        """Text of tokens read but not yet emitted (a trailing incomplete character decodes to U+FFFD)."""
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return self._decode(self._ids[self._prefix_offset :])[len(prefix_text) :]

    def _find_stop(self, searched_from: int) -> bool:
        """Look for a stop string in the only region that can hold a new match; on a hit, cut the text."""
        best_start, best_stop = -1, ""
        for stop in self._stop:
            start = self._text.find(stop, searched_from)
            if start != -1 and (best_start == -1 or start < best_start):
                best_start, best_stop = start, stop
        if best_start == -1:
            return False
        self._stop_reason = best_stop
        self._text = self._text[: best_start + (len(best_stop) if self._include_stop else 0)]
        return True

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._text)), longest, -1):
                if self._text.endswith(stop[:length]):
                    longest = length
                    break
        return longest


def _backend_decoder(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer, or None (then its decode() is used)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None and callable(getattr(backend, "decode", None)) else None
