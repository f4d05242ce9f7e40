"""A small OpenAI-compatible stand-in backend for gateway tests: starts in under a second, names itself in
every answer, streams SSE, exports tokenmill:num_requests_{waiting,running}, and can cut a stream on request.

Run: python tests/gateway/stub_server.py --port P --name NAME [--token-delay S] [--api-key K]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


class StubState:
    def __init__(self, name: str, port: int, token_delay: float, api_key: str | None) -> None:
        self.name = name
        self.port = port
        self.token_delay = token_delay
        self.api_key = api_key
        self.running = 0
        self.served = 0
        self.bodies: list[dict] = []  # every generation request received, for tests of what the gateway sends


def _words(body: dict) -> int:
    return int(body.get("max_tokens") or body.get("max_completion_tokens") or 4)


def _prompts(body: dict) -> list:
    """The prompts of a request (one for chat): text, or a list of token ids."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt
    if prompt is None:
        return [" ".join(str(m.get("content")) for m in body.get("messages", []))]
    return [prompt]


def _count(prompt: object) -> int:
    """The stub's tokens: one per word of text, one per id of a token-id prompt."""
    return len(prompt) if isinstance(prompt, list) else len(str(prompt).split())


def _token_ids(text: str) -> list[int]:
    return [len(word) for word in text.split()]  # any deterministic ids: tests compare with /tokenize's


def build_app(state: StubState) -> FastAPI:
    app = FastAPI()
    ident = f"{state.name}@{state.port}"

    def denied(request: Request) -> JSONResponse | None:
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            error = {
                "message": "bad backend key",
                "type": "authentication_error",
                "param": None,
                "code": None,
            }
            return JSONResponse({"error": error}, 401)
        return None

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        label = f'model_name="{state.name}"'
        text = (
            "# TYPE tokenmill:num_requests_running gauge\n"
            f"tokenmill:num_requests_running{{{label}}} {state.running}\n"
            "# TYPE tokenmill:num_requests_waiting gauge\n"
            f"tokenmill:num_requests_waiting{{{label}}} 0\n"
            "# TYPE tokenmill:request_success_total counter\n"
            f"tokenmill:request_success_total{{{label}}} {state.served}\n"
        )
        return PlainTextResponse(text)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        body = await request.json()
        prompt = _prompts(body)[0]
        tokens = prompt if isinstance(prompt, list) else _token_ids(str(prompt))
        return {"count": len(tokens), "max_model_len": 4096, "tokens": tokens}

    @app.get("/stub/requests")
    async def requests() -> list[dict]:
        return state.bodies

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": state.name, "object": "model", "created": 0, "owned_by": "stub"}],
        }

    async def generate(request: Request, chat: bool) -> JSONResponse | StreamingResponse:
        if (bad := denied(request)) is not None:
            return bad
        body = await request.json()
        if body.get("model") != state.name:
            error = {"message": f"unknown model {body.get('model')}", "type": "invalid_request_error",
                     "param": "model", "code": "model_not_found"}  # fmt: skip
            return JSONResponse({"error": error}, 404)
        state.bodies.append(body)
        n_words = _words(body)
        # stub_cut_after cuts the stream after that many words; with stub_cut_once_file, only the first request
        # (of any stub process) that finds the file missing is cut, so a resumed continuation is served whole.
        cut_after = body.get("stub_cut_after")
        once_file = body.get("stub_cut_once_file")
        if cut_after is not None and once_file is not None:
            if os.path.exists(once_file):
                cut_after = None
            else:
                open(once_file, "w").close()
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        state.running += 1
        if not body.get("stream"):
            try:
                await asyncio.sleep(state.token_delay * n_words)
            finally:
                state.running -= 1
            state.served += 1
            text = " ".join([ident] * n_words)
            choice = {"index": 0, "finish_reason": "length", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            usage = {"prompt_tokens": 1, "completion_tokens": n_words, "total_tokens": n_words + 1}
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": state.name,
                    "choices": [choice],
                    "usage": usage,
                }
            )

        prompts = _prompts(body)
        n = int(body.get("n") or 1)
        num_choices = n * (1 if chat else len(prompts))

        async def events():
            try:
                for i in range(n_words):
                    await asyncio.sleep(state.token_delay)
                    if cut_after is not None and i >= int(cut_after):
                        # Break the HTTP stream mid-body, as a crashing backend would.
                        raise RuntimeError("stub: cutting the stream on purpose")
                    for index in range(num_choices):
                        word = ident if num_choices == 1 else f"{ident}#{index}"
                        piece = word if i == 0 else f" {word}"
                        last = {"finish_reason": "length"} if i == n_words - 1 else {"finish_reason": None}
                        if chat:
                            delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                            choice = {"index": index, "delta": delta, **last, "logprobs": None}
                            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created,
                                     "model": state.name, "choices": [choice]}  # fmt: skip
                        else:
                            choice = {"index": index, "text": piece, **last, "logprobs": None}
                            chunk = {"id": rid, "object": obj, "created": created, "model": state.name,
                                     "choices": [choice]}  # fmt: skip
                        yield f"data: {json.dumps(chunk)}\n\n"
                state.served += 1
                if (body.get("stream_options") or {}).get("include_usage"):
                    used = sum(_count(p) for p in prompts)
                    done = n_words * num_choices
                    usage = {"prompt_tokens": used, "completion_tokens": done, "total_tokens": used + done}
                    chunk = {"id": rid, "object": obj, "created": created, "model": state.name, "choices": [],
                             "usage": usage}  # fmt: skip
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state.running -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, chat=True)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--token-delay", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args()
    state = StubState(args.name, args.port, args.token_delay, args.api_key)
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
