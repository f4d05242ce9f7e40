"""Per-HTTP-request bookkeeping: timing seen by the client, the one log line per request, histogram observations.

Routes create a RequestRecord, feed it every RequestOutput they receive, and call ``finish(status)`` exactly once.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from dataclasses import dataclass

from tokenmill.outputs import RequestOutput
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger("tokenmill.server.requests")


@dataclass
class RequestFate:
    """Set by the server when it ends a request itself (drain timeout), so the record does not blame the client."""

    cut_reason: str | None = None


# The lifecycle middleware sets one RequestFate per HTTP request; routes' records read it in finish().
REQUEST_FATE: ContextVar[RequestFate | None] = ContextVar("tokenmill_request_fate", default=None)


class RequestRecord:
    def __init__(self, request_id: str, endpoint: str, metrics: ServerMetrics, log_prompts: bool) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.start = time.monotonic()
        self.first_token_at: float | None = None
        self.prompt_text: str | None = None
        self.finish_reasons: list[str] = []
        self._prompt_tokens: dict[str, int] = {}
        self._tokens: dict[tuple[str, int], int] = {}  # (engine request id, choice index) -> tokens seen
        self._last_token_at: dict[tuple[str, int], float] = {}
        self._finished = False

    @property
    def prompt_tokens(self) -> int:
        return sum(self._prompt_tokens.values())

    @property
    def output_tokens(self) -> int:
        return sum(self._tokens.values())

    def on_output(self, output: RequestOutput) -> None:
        now = time.monotonic()
        self._prompt_tokens[output.request_id] = len(output.prompt_token_ids)
        for choice in output.outputs:
            key = (output.request_id, choice.index)
            new = len(choice.token_ids) - self._tokens.get(key, 0)
            if new <= 0:
                continue
            if self.first_token_at is None:
                self.first_token_at = now
                self.metrics.observe_ttft(now - self.start)
            last = self._last_token_at.get(key)
            if last is not None:
                self.metrics.observe_inter_token((now - last) / new, new)
            self._tokens[key] = len(choice.token_ids)
            self._last_token_at[key] = now
        if output.finished:
            reason = output.outputs[0].finish_reason if output.outputs else None
            self.finish_reasons.append(reason or "unknown")
            self.metrics.observe_finished(reason or "unknown")
            m = output.metrics
            if m is not None and m.first_scheduled_time is not None:
                self.metrics.observe_queue_time(max(0.0, m.first_scheduled_time - m.arrival_time))

    def finish(self, status: int, error: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        latency = time.monotonic() - self.start
        fate = REQUEST_FATE.get()
        aborted = status == 499
        if aborted and fate is not None and fate.cut_reason is not None:
            status, error = 503, fate.cut_reason  # the server cut it; the client did not leave
        if aborted:  # the client went away or the server cut it; vLLM counts both as finished_reason="abort"
            self.finish_reasons.append("abort")
            self.metrics.observe_finished("abort")
        if status == 200 and self.first_token_at is not None:
            self.metrics.observe_e2e(latency)
        ttft = f"{self.first_token_at - self.start:.3f}s" if self.first_token_at is not None else "-"
        line = (
            f"request {self.request_id} {self.endpoint} status={status} prompt_tokens={self.prompt_tokens} "
            f"output_tokens={self.output_tokens} ttft={ttft} latency={latency:.3f}s "
            f"finish={','.join(self.finish_reasons) or '-'}"
        )
        if error:
            line += f" error={error!r}"
        if self.log_prompts and self.prompt_text is not None:
            line += f" prompt={self.prompt_text!r}"
        logger.info(line)


def log_rejected(method: str, path: str, status: int, message: str) -> None:
    """The log line of a request refused before any route ran (validation, auth, size, draining, no route)."""
    logger.info("request - %s %s status=%d error=%r", method, path, status, message)
