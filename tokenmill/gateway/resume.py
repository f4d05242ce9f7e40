"""Resuming a stream whose replica died mid-way: what the client has seen so far, and the continuation requests.

``StreamProgress`` watches every SSE event the gateway relays: per choice index, the text sent, its chunk count
(tokenmill sends one chunk per token) and whether it finished; the stream's id. When the stream is cut, every
unfinished choice is continued on another replica, one after the other, by a single-choice request (``n: 1``)
that goes on from that choice's text: completions send the choice's own prompt + its text (a token-id prompt
gets the text's token ids from the replica's ``/tokenize``); chat sends the partial assistant message with
vLLM's ``continue_final_message``. ``relay()`` splices each continuation's events into the client's stream:
same id, the choice's own index, no second role chunk; the usage chunk and ``[DONE]`` are held back and sent
once at the end (``closing()``), usage counted as if one replica had answered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DONE_EVENT = b"data: [DONE]\n\n"


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
    """The ``/tokenize`` body (tokenmill, vLLM) that counts a continuation's text prompt or messages."""
    if "messages" in body:
        return {"messages": body["messages"], "add_generation_prompt": False}
    return {"prompt": body["prompt"]}


def is_token_ids(prompt: object) -> bool:
    return isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def split_prompts(prompt: object) -> list[str | list[int]] | None:
    """A completions ``prompt`` as its list of prompts (text or token ids), or None if it is neither."""
    if isinstance(prompt, str) or (is_token_ids(prompt) and prompt):
        return [prompt]  # type: ignore[list-item]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or (is_token_ids(p) and p) for p in prompt):
        return list(prompt)
    return None


@dataclass
class ChoiceProgress:
    text: str = ""  # the text sent to the client
    chunks: int = 0  # content chunks sent: tokenmill streams one per token (a split character merges two)
    finished: bool = False  # a finish_reason was relayed
    tokens: int | None = None  # completion tokens, once a continuation's usage counted them


class StreamProgress:
    def __init__(self, path: str, body: dict[str, Any]) -> None:
        self.chat = path.endswith("/chat/completions")
        self.body = body
        n = body.get("n")
        self.n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
        self.prompts = None if self.chat else split_prompts(body.get("prompt"))
        self.num_choices = self.n * (1 if self.chat else len(self.prompts or [None]))
        self.choices = {i: ChoiceProgress() for i in range(self.num_choices)}
        self.done = False  # the first replica's [DONE] was relayed
        self.stream_id: str | None = None
        self.created: int | None = None
        self.model: str | None = None
        self.object: str | None = None
        self.resumes = 0
        self.current: int | None = None  # the choice the running continuation produces
        self._chunks_before_resume = 0  # what the current continuation's prompt already holds
        self._usage: dict[str, int] | None = None  # the running continuation's usage (held back)
        self._prompt_tokens: dict[int, int] = {}  # prompt index -> its token count, from continuations' usage
        self.wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for p, prompt in enumerate(self.prompts or []):
            if is_token_ids(prompt):
                self._prompt_tokens[p] = len(prompt)

    # --- what can be resumed --------------------------------------------------------------------------------
    def resumable(self) -> bool:
        """Text and token-id prompts, lists of them, chat, any ``n``; not ``echo`` (the echoed prompt is part of
        the choice's text) nor ``best_of`` > n (the server picks the choices at the end)."""
        if self.body.get("echo"):
            return False
        best_of = self.body.get("best_of")
        if isinstance(best_of, int) and best_of > self.n:
            return False
        if self.chat:
            return isinstance(self.body.get("messages"), list)
        return self.prompts is not None

    @property
    def finished(self) -> bool:
        """Every choice finished (or the stream's [DONE] was seen): nothing is left to generate."""
        return self.done or all(c.finished for c in self.choices.values())

    def pending(self) -> list[int]:
        """Choice indexes still to generate, in order."""
        return [] if self.done else [i for i, c in self.choices.items() if not c.finished]

    def needs_token_ids(self, index: int) -> bool:
        """Whether the continuation of ``index`` needs its text as token ids (a token-id prompt with text sent)."""
        return bool(self.prompts) and is_token_ids(self.prompts[index // self.n]) and bool(self.choices[index].text)

    def text_of(self, index: int) -> str:
        return self.choices[index].text

    def prompt_count_requests(self) -> dict[int, dict[str, Any]]:
        """``/tokenize`` bodies for the original prompts not counted yet (for the final usage)."""
        if self.chat:
            if 0 in self._prompt_tokens or not isinstance(self.body.get("messages"), list):
                return {}
            return {0: {"messages": self.body["messages"],
                        "add_generation_prompt": self.body.get("add_generation_prompt", True)}}  # fmt: skip
        return {p: {"prompt": prompt} for p, prompt in enumerate(self.prompts or [])
                if p not in self._prompt_tokens and isinstance(prompt, str)}  # fmt: skip

    def set_prompt_tokens(self, prompt_index: int, count: int) -> None:
        self._prompt_tokens[prompt_index] = count

    # --- the continuation -----------------------------------------------------------------------------------
    def continuation(self, index: int, text_token_ids: list[int] | None = None) -> dict[str, Any]:
        """The single-choice request that continues choice ``index`` on another replica (``text_token_ids``: its
        text as token ids, for a token-id prompt)."""
        choice = self.choices[index]
        body = {**self.body, "stream": True, "n": 1}
        body.pop("best_of", None)
        if self.wants_usage:
            body["stream_options"] = {**(self.body.get("stream_options") or {}), "include_usage": True}
        self.resumes += 1
        self.current = index
        self._chunks_before_resume = choice.chunks
        self._usage = None
        if not self.chat:
            assert self.prompts is not None  # resumable() said so
            prompt = self.prompts[index // self.n]
            if choice.text:
                if isinstance(prompt, str):
                    prompt = prompt + choice.text
                else:
                    if text_token_ids is None:
                        raise ValueError("a token-id prompt's continuation needs the sent text's token ids")
                    prompt = [*prompt, *text_token_ids]
            body["prompt"] = prompt
        if not choice.text:
            return body  # nothing sent yet for this choice but the role chunk: start it over
        if not self.chat and body.get("max_tokens") is None:
            body["max_tokens"] = COMPLETIONS_DEFAULT_MAX_TOKENS
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int):
                body[key] = max(1, body[key] - choice.chunks)
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = max(0, body["min_tokens"] - choice.chunks)
        if self.chat:
            body["messages"] = [*self.body["messages"], {"role": "assistant", "content": choice.text}]
            body["add_generation_prompt"] = False
            body["continue_final_message"] = True
        return body

    # --- relaying -------------------------------------------------------------------------------------------
    def relay(self, events: bytes) -> bytes:
        """Record whole SSE events on their way to the client; after a resume, rewrite them to splice in."""
        out = [self._one(event) for event in events.replace(b"\r\n", b"\n").split(b"\n\n") if event.strip()]
        if not self.resumes:
            return events  # the first replica's bytes go through untouched
        return b"".join(event + b"\n\n" for event in out if event)

    def closing(self) -> bytes:
        """After a resumed stream's last continuation: the usage chunk (if the client asked for it) and [DONE]."""
        self.end_continuation()
        if not self.wants_usage:
            return DONE_EVENT
        prompt = sum(self._prompt_tokens.values())
        completion = sum(c.chunks if c.tokens is None else c.tokens for c in self.choices.values())
        chunk = {"id": self.stream_id, "object": self.object, "created": self.created, "model": self.model,
                 "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                          "total_tokens": prompt + completion}}  # fmt: skip
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n" + DONE_EVENT

    def end_continuation(self) -> None:
        """The running continuation's stream ended: book its usage (the text its prompt held counts as
        completion tokens) before the next one starts."""
        usage, index = self._usage, self.current
        self._usage = None
        if usage is None or index is None:
            return
        moved = min(self._chunks_before_resume, usage.get("prompt_tokens", 0))
        self.choices[index].tokens = moved + usage.get("completion_tokens", 0)
        self._prompt_tokens.setdefault(index // self.n, usage.get("prompt_tokens", 0) - moved)

    def _one(self, event: bytes) -> bytes:
        data = b"".join(line[len(b"data:"):].strip() for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return event
        if data == b"[DONE]":
            if self.resumes:
                return b""  # held back: closing() ends the client's stream once every choice is done
            self.done = True
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
        self.model = self.model or payload.get("model")
        self.object = self.object or payload.get("object")
        for choice in payload.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) not in self.choices:
                continue
            progress = self.choices[choice.get("index", 0)]
            piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
            if isinstance(piece, str) and piece:
                progress.text += piece
                progress.chunks += 1
            if choice.get("finish_reason") is not None:
                progress.finished = True

    def _splice(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        payload["id"] = self.stream_id or payload.get("id")
        payload["created"] = self.created or payload.get("created")
        choices = payload.get("choices")
        usage = payload.get("usage")
        if not choices:
            if isinstance(usage, dict):
                self._usage = usage  # held back for closing()
            return None
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            choice["index"] = self.current  # the continuation's single choice is this one of the client's
            delta = choice.get("delta")
            if isinstance(delta, dict) and delta.pop("role", None) is not None:
                if not delta.get("content") and choice.get("finish_reason") is None and not choice.get("logprobs"):
                    return None  # the continuation's own role chunk: the client had one already
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            # vLLM's continuous usage stats: the continuation's prompt holds text sent before it.
            moved = min(self._chunks_before_resume, usage["prompt_tokens"])
            usage["prompt_tokens"] -= moved
            usage["completion_tokens"] = usage.get("completion_tokens", 0) + moved
        return payload

