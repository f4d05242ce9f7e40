"""Per-request timing record written by the HTTP client and read by the metric functions.

Times are seconds on one ``time.perf_counter`` clock, relative to the benchmark's start.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Error kinds a request can end with; ``http_<status>`` is added per status code.
ERROR_TIMEOUT = "timeout"
ERROR_DISCONNECT = "disconnect"  # the peer closed or reset the connection mid-request
ERROR_CONNECT = "connect"  # the connection could not be opened
ERROR_PROTOCOL = "protocol"  # malformed SSE/JSON, or the stream ended without [DONE]
ERROR_STREAM = "stream_error"  # the server sent an error object inside a 200 stream
ERROR_CLIENT = "client_error"  # anything else raised while sending or reading


def http_error_kind(status: int) -> str:
    return f"http_{status}"


@dataclass
class RequestRecord:
    """What happened to one request; ``error`` is None when it completed."""

    index: int
    start: float
    end: float
    token_times: list[float] = field(default_factory=list)  # arrival time of each chunk carrying text
    output_tokens: int = 0
    prompt_tokens: int = 0
    output_tokens_source: str = "chunks"  # "usage" when the server reported completion_tokens
    expected_output_tokens: int | None = None
    error: str | None = None
    error_detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def first_token(self) -> float | None:
        return self.token_times[0] if self.token_times else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestRecord:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in names})
