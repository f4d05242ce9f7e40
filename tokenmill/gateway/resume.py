"""Resuming a stream whose replica died mid-way: what the client has seen so far, and the continuation request.

``StreamProgress`` watches every SSE event the gateway relays (choice 0's text, one chunk per token as tokenmill
sends them, the stream's id and whether it finished). When the stream is cut, ``continuation()`` is the same
request asking another replica to go on from the text already sent (completions: prompt + text; chat: the
partial assistant message with vLLM's ``continue_final_message``), and ``relay()`` splices that replica's events
into the client's stream: same id, no second role chunk, usage counted as if one replica had answered.
"""

from __future__ import annotations

import json
from typing import Any

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def fit_to_context(body: dict[str, Any], prompt_tokens: int, max_model_len: int) -> bool:
    """Lower the continuation's token budget so prompt + budget fits the replica's context; False if nothing fits.

    Re-tokenizing the text already sent can take more tokens than were generated (a replacement character
    for a split UTF-8 sequence is three bytes), so the replica's own count decides.
    """
    room = max_model_len - prompt_tokens
    if room < 1:
        return False
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int):
            body[key] = min(body[key], room)
    return True


def tokenize_request(body: dict[str, Any]) -> dict[str, Any]:
    """The ``/tokenize`` body (tokenmill, vLLM) that counts a continuation's prompt."""
    if "messages" in body:
        return {"messages": body["messages"], "add_generation_prompt": False}
    return {"prompt": body["prompt"]}


class StreamProgress:
    def __init__(self, path: str, body: dict[str, Any]) -> None:
        self.chat = path.endswith("/chat/completions")
        self.body = body
        self.text = ""  # choice 0's text sent to the client
        self.chunks = 0  # content chunks sent: tokenmill streams one per token (a split character merges two)
        self.finished = False  # a finish_reason or [DONE] was relayed
        self.stream_id: str | None = None
        self.created: int | None = None
        self.resumes = 0
        self._chunks_before_resume = 0  # what the current continuation's prompt already holds

    def resumable(self) -> bool:
        """Single-choice text requests only: n > 1, echo or token-id prompts cannot be continued as text."""
        if self.body.get("n", 1) not in (None, 1) or self.body.get("echo"):
            return False
        if self.chat:
            return isinstance(self.body.get("messages"), list)
        return isinstance(self.body.get("prompt"), str)

    def continuation(self) -> dict[str, Any]:
        """The request that continues this stream on another replica."""
        body = {**self.body, "stream": True}
        self.resumes += 1
        self._chunks_before_resume = self.chunks
        if not self.text:
            return body  # nothing sent yet but the role chunk: start over
        if not self.chat and body.get("max_tokens") is None:
            body["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                body[key] = max(1, body[key] - self.chunks)
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = max(0, body["min_tokens"] - self.chunks)
        if self.chat:
            body["messages"] = [*self.body["messages"], {"role": "assistant", "content": self.text}]
            body["add_generation_prompt"] = False
            body["continue_final_message"] = True
        else:
            body["prompt"] = self.body["prompt"] + self.text
        return body

    def relay(self, events: bytes) -> bytes:
        """Record whole SSE events on their way to the client; after a resume, rewrite them to splice in."""
        out = [self._one(event) for event in events.replace(b"\r\n", b"\n").split(b"\n\n") if event.strip()]
        if not self.resumes:
            return events  # the first replica's bytes go through untouched
        return b"".join(event + b"\n\n" for event in out if event)

    def _one(self, event: bytes) -> bytes:
        data = b"".join(line[len(b"data:"):].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return event
        if data == b"[DONE]":
            self.finished = True
            return event
        try:
            payload = json.loads(data)
        except ValueError:
            return event
        if not isinstance(payload, dict):
            return event
        if self.resumes:
            spliced = self._splice(payload)
            if spliced is None:
                return b""
            payload = spliced
        self._track(payload)
        return b"data: " + json.dumps(payload, ensure_ascii=False).encode() if self.resumes else event

    def _track(self, payload: dict[str, Any]) -> None:
        self.stream_id = self.stream_id or payload.get("id")
        self.created = self.created or payload.get("created")
        for choice in payload.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if isinstance(piece, str) and piece:
                self.text += piece
                self.chunks += 1
            if choice.get("finish_reason") is not None:
                self.finished = True

    def _splice(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        payload["id"] = self.stream_id or payload.get("id")
        payload["created"] = self.created or payload.get("created")
        for choice in payload.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if isinstance(delta, dict) and delta.pop("role", None) is not None:
                if not delta.get("content") and choice.get("finish_reason") is None and not choice.get("logprobs"):
                    return None  # the continuation's own role chunk: the client had one already
        usage = payload.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            # The continuation's prompt holds the text sent before it: count those tokens as completion.
            moved = min(self._chunks_before_resume, usage["prompt_tokens"])
            usage["prompt_tokens"] -= moved
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + moved
        return payload
