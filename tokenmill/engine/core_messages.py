"""What crosses between the API process and the engine-core process: plain data, one codec.

API → core (``encode_request``: pickle, since SamplingParams is a dataclass and adds are per request, not per
token): ("add", request_id, prompt_token_ids, params, prompt, arrival_time), ("abort", [request_ids]),
("shutdown",).

Core → API, one message per engine-loop turn (``CoreOutputs``, msgspec msgpack: ~20% cheaper than pickle on
a 256-request step, benchmarks/results/engine_channel_codec_*.json):
  accepted: request ids the core added; rejected: [request_id, kind, message] (kind "invalid" | "queue_full" |
  "internal"); outputs: one ``SeqDelta`` per sequence that progressed, with only its NEW token ids;
  stats: the EngineSnapshot fields in order; dead: the crash's "Type: message" when the loop died.
Times are time.monotonic() (CLOCK_MONOTONIC, shared by every process on the host).
"""

from __future__ import annotations

import msgspec

# Order of the stats tuple (EngineSnapshot's fields).
STAT_FIELDS = ("num_running", "num_waiting", "kv_cache_usage", "prefix_cache_queries", "prefix_cache_hits",
               "num_preemptions", "prompt_tokens", "generation_tokens", "num_steps", "spec_decode_num_drafts",
               "spec_decode_num_draft_tokens", "spec_decode_num_accepted_tokens")
# After them, the stats list carries speculative decoding's accepted drafts per position (any length).


class SeqDelta(msgspec.Struct, array_like=True):
    request_id: str
    index: int  # the sequence's index among the request's n
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    new_logprobs: list[list[list[float]]] | None = None  # per new token: [[token_id, logprob, rank], ...]
    request_finished: bool = False
    num_cached_tokens: int = 0
    times: list[float | None] | None = None  # arrival, first scheduled, first token, last token, finished


class CoreOutputs(msgspec.Struct, array_like=True):
    accepted: list[str] = []
    rejected: list[list[str]] = []
    outputs: list[SeqDelta] = []
    stats: list[float] = []
    dead: str | None = None


class OutputCodec:
    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreOutputs)

    def encode(self, message: CoreOutputs) -> bytes:
        return self._encoder.encode(message)

    def decode(self, data: bytes) -> CoreOutputs:
        return self._decoder.decode(data)
